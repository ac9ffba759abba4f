"""KafkaBroker: amb's adapter contract on a Kafka cluster, through confluent-kafka (librdkafka).

Why confluent-kafka and not aiokafka: measured on the same tansu, same run, it moved about
3.5x the records end to end (docs/kafka.md has the figures), and its idempotent producer works
on tansu where aiokafka's fails. Its asyncio producer (``confluent_kafka.aio``) refuses
headers, so the threaded ``Producer`` is used: ``produce`` is a non-blocking call from the
event loop, and one thread polls for delivery reports and hands them back to the loop in one
call per batch. librdkafka reconnects by itself (with the backoff of the
:class:`~amb_core.runtime.ReconnectPolicy` given), so no Supervisor loop is needed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from amb_core._optional import require
from amb_core.adapters.kafka.consumer import KEY_HEADER, KafkaSubscription
from amb_core.adapters.kafka.names import amb_topic, kafka_regex, kafka_topic
from amb_core.broker import INBOX_PREFIX, Broker, Capabilities, Delivery, DeliveryHandler
from amb_core.errors import BrokerConnectionError, NotConnected, UnsupportedFeature
from amb_core.runtime import ErrorMap, ReconnectPolicy
from amb_core.topics import is_wildcard, matches

logger = logging.getLogger(__name__)

_SECRET_KEYS = ("password", "secret", "token", "key.password", "sasl.oauthbearer.config")


def _kafka() -> Any:
    return require("confluent_kafka", "kafka")


def _admin_module() -> Any:
    return require("confluent_kafka.admin", "kafka")


def _connection_errors() -> list[tuple[Any, type[BaseException]]]:
    kafka = _kafka()
    return [(kafka.KafkaException, BrokerConnectionError)]


class KafkaBroker(Broker):
    """A Kafka topic per amb topic, Kafka consumer groups, replay from the log.

    ``bootstrap_servers``: ``"host:port,host:port"`` or a list. ``partitions`` and
    ``replication_factor`` apply to topics the adapter creates (on first publish or
    subscribe). ``security_protocol``, ``sasl_mechanism`` (PLAIN, SCRAM-SHA-256/512,
    OAUTHBEARER), ``sasl_username``, ``sasl_password`` and the ``ssl_*`` options pass
    through to librdkafka, as does any librdkafka property in ``config`` (applied to producer,
    consumers and admin), ``producer_config`` and ``consumer_config``. No secret appears in
    ``repr`` or a log line.

    Durable by default: ``acks=all`` and the idempotent producer (``idempotence``).
    ``delivery_timeout``: how long a publish may wait for the broker (librdkafka retries
    meanwhile, across reconnects) before it fails. ``session_timeout``: the group session
    (a member that stops heartbeating is replaced after it; Kafka brokers refuse less than 6 s
    by default). ``metadata_refresh``: how often wildcard subscriptions look for new topics.
    ``fetch_wait``: librdkafka's ``fetch.wait.max.ms``; tansu answers a fetch only when it
    expires, so it bounds the latency of a delivery (and of each leg of a request) there.
    """

    header_prefix = "ce_"

    def __init__(
        self,
        bootstrap_servers: str | list[str] = "localhost:9092",
        *,
        partitions: int = 1,
        replication_factor: int = -1,
        topic_config: Mapping[str, str] | None = None,
        idempotence: bool = True,
        linger_ms: float = 2.0,
        compression: str | None = None,
        delivery_timeout: float = 30.0,
        session_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        metadata_refresh: float = 2.0,
        fetch_wait: float = 0.1,
        max_payload: int = 1_000_000,
        reply_retention: float = 3600.0,
        security_protocol: str | None = None,
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        sasl_oauthbearer_config: str | None = None,
        ssl_cafile: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_password: str | None = None,
        config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        reconnect: ReconnectPolicy | None = None,
        client_id: str = "amb-core",
    ) -> None:
        if isinstance(bootstrap_servers, str):
            servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
        else:
            servers = list(bootstrap_servers)
        if not servers:
            raise ValueError("bootstrap_servers names no server")
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.bootstrap_servers = servers
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.topic_config = dict(topic_config or {})
        self.idempotence = idempotence
        self.delivery_timeout = delivery_timeout
        self.session_timeout = session_timeout
        self.metadata_refresh = metadata_refresh
        self.reconnect = reconnect or ReconnectPolicy()
        self.reply_retention = reply_retention
        self.capabilities = Capabilities(
            wildcards=True,
            consumer_groups=True,
            persistent=True,
            redelivers_unacked=False,  # redelivered, yes; counted, no (docs/kafka.md)
            replay=True,
            ordering=partitions == 1,
            at_least_once=True,
            headers=True,
            reconnect=True,
            max_payload=max_payload,
            ordering_keys=True,  # the key is the record key: one key, one partition, one member
        )
        common: dict[str, Any] = {
            "bootstrap.servers": ",".join(servers),
            "client.id": client_id,
            "reconnect.backoff.ms": max(1, int(self.reconnect.initial_delay * 1000)),
            "reconnect.backoff.max.ms": max(1, int(self.reconnect.max_delay * 1000)),
            "socket.connection.setup.timeout.ms": max(1000,
                                                      int(self.reconnect.connect_timeout * 1000)),
        }
        security = {
            "security.protocol": security_protocol,
            "sasl.mechanism": sasl_mechanism,
            "sasl.username": sasl_username,
            "sasl.password": sasl_password,
            "sasl.oauthbearer.config": sasl_oauthbearer_config,
            "ssl.ca.location": ssl_cafile,
            "ssl.certificate.location": ssl_certfile,
            "ssl.key.location": ssl_keyfile,
            "ssl.key.password": ssl_password,
        }
        common.update({k: v for k, v in security.items() if v is not None})
        common.update(config or {})
        self._common = common
        heartbeat = heartbeat_interval if heartbeat_interval is not None else \
            min(3.0, session_timeout / 3)
        self._producer_config: dict[str, Any] = {
            **common,
            "acks": "all",
            "enable.idempotence": idempotence,
            "linger.ms": linger_ms,
            "message.timeout.ms": max(1, int(delivery_timeout * 1000)),
            "message.max.bytes": max_payload + 64 * 1024,
            **({"compression.type": compression} if compression else {}),
            **dict(producer_config or {}),
        }
        self._consumer_config: dict[str, Any] = {
            **common,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": int(session_timeout * 1000),
            "heartbeat.interval.ms": max(1, int(heartbeat * 1000)),
            "topic.metadata.refresh.interval.ms": max(100, int(metadata_refresh * 1000)),
            "fetch.wait.max.ms": max(1, int(fetch_wait * 1000)),
            "fetch.max.bytes": max(52428800, max_payload + 64 * 1024),
            "message.max.bytes": max(1000000, max_payload + 64 * 1024),
            **dict(consumer_config or {}),
        }
        self._errors = ErrorMap("kafka", _connection_errors)
        self._producer: Any = None
        self._admin: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[None], Any]] = []
        self._reports_lock = threading.Lock()
        self._reports_scheduled = False
        self._topics: dict[str, str] = {}
        """amb topic -> Kafka name, for topics known to exist."""
        self._creating: dict[str, asyncio.Future[None]] = {}
        self._subscriptions: set[KafkaSubscription] = set()
        self._inboxes: set[str] = set()
        self._dead_letter_topics: set[str] = set()
        self._closing: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        servers = ",".join(self.bootstrap_servers)
        sasl = self._common.get("sasl.mechanism")
        extra = f", sasl_mechanism={sasl!r}" if sasl else ""
        return f"KafkaBroker(bootstrap_servers={servers!r}{extra})"

    @classmethod
    def from_url(cls, url: str) -> KafkaBroker:
        """``kafka://host:port[,host:port]`` (``kafkas://`` for TLS); ``user:password@`` gives
        SASL PLAIN credentials (``?sasl_mechanism=SCRAM-SHA-512`` another mechanism), and
        ``?partitions=3`` the partitions of created topics."""
        parts = urlsplit(url)
        netloc = parts.netloc
        options: dict[str, Any] = {}
        if "@" in netloc:
            credentials, netloc = netloc.rsplit("@", 1)
            user, _, password = credentials.partition(":")
            options["sasl_username"] = unquote(user)
            options["sasl_password"] = unquote(password)
            options["sasl_mechanism"] = "PLAIN"
        tls = parts.scheme.lower() in ("kafkas", "kafka+ssl")
        if "sasl_username" in options:
            options["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        elif tls:
            options["security_protocol"] = "SSL"
        for item in filter(None, parts.query.split("&")):
            name, _, value = item.partition("=")
            if name == "partitions":
                options["partitions"] = int(value)
            elif name == "sasl_mechanism":
                options["sasl_mechanism"] = unquote(value)
            else:
                raise ValueError(f"unknown option {name!r} in a kafka:// URL")
        if not netloc:
            raise ValueError("a kafka:// URL needs host:port")
        return cls(bootstrap_servers=netloc, **options)

    # --- lifecycle ------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._producer is not None:
            return
        kafka, admin_module = _kafka(), _admin_module()
        self._loop = asyncio.get_running_loop()
        self._closing = None
        admin = admin_module.AdminClient(self._common, logger=logger)
        timeout = self.reconnect.connect_timeout
        try:
            await asyncio.to_thread(admin.list_topics, timeout=timeout)
        except kafka.KafkaException as exc:
            raise BrokerConnectionError(
                f"cannot connect to Kafka at {','.join(self.bootstrap_servers)} within "
                f"{timeout}s: {exc}"
            ) from exc
        self._admin = admin
        self._producer = kafka.Producer(self._producer_config, logger=logger)
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="amb-kafka producer",
                                        daemon=True)
        self._poller.start()

    async def close(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        if self._producer is None:
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await asyncio.gather(*(sub.close() for sub in list(self._subscriptions)),
                                 return_exceptions=True)
            producer, self._producer = self._producer, None
            await asyncio.to_thread(producer.flush, self.delivery_timeout)
            self._stop.set()
            poller, self._poller = self._poller, None
            if poller is not None:
                await asyncio.to_thread(poller.join, 5)
            self._settle()
            await self._delete_inboxes()
            self._admin = None
            self._topics.clear()
        finally:
            self._closing.set_result(None)

    async def _delete_inboxes(self) -> None:
        if not self._inboxes or self._admin is None:
            return
        names = [kafka_topic(inbox) for inbox in self._inboxes]
        self._inboxes.clear()
        with contextlib.suppress(Exception):
            futures = self._admin.delete_topics(names, operation_timeout=5)
            await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()),
                               return_exceptions=True), 5)

    # --- producing ------------------------------------------------------------------------------

    def _poll(self) -> None:
        """The producer's thread: delivery reports, handed to the loop once per batch."""
        producer, stop = self._producer, self._stop
        while not stop.is_set():
            producer.poll(0.1)
        producer.poll(0)

    def _report(self, future: asyncio.Future[None], error: Any, record: Any) -> None:
        """Delivery report (producer thread)."""
        with self._reports_lock:
            self._reports.append((future, error))
            if self._reports_scheduled:
                return
            self._reports_scheduled = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._reports_lock:
            reports, self._reports = self._reports, []
            self._reports_scheduled = False
        for future, error in reports:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(self._delivery_error(error))

    def _delivery_error(self, error: Any) -> BaseException:
        kafka = _kafka()
        code = error.code()
        if code == kafka.KafkaError.MSG_SIZE_TOO_LARGE:
            return ValueError(f"kafka refused the record as over its size limit: {error.str()}")
        return BrokerConnectionError(f"kafka: publish failed: {error.str()}")

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        producer = self._producer
        if producer is None:
            raise NotConnected("KafkaBroker is not connected (call connect(); closed?)")
        name = self._topics.get(topic)
        if name is None:
            name = await self._ensure_topic(topic)
        future: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        try:
            producer.produce(name, body, headers.get(KEY_HEADER), headers=headers,
                             on_delivery=partial(self._report, future))
        except BufferError:
            await self._produce_when_room(name, body, headers, future)
        except _kafka().KafkaException as exc:
            raise self._errors.translate(exc, f"publish to {topic!r}") from exc
        await future

    async def _produce_when_room(self, name: str, body: bytes, headers: dict[str, str],
                                 future: asyncio.Future[None]) -> None:
        """librdkafka's local queue is full: wait for room (backpressure), bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delivery_timeout
        while True:
            await asyncio.sleep(0.005)
            producer = self._producer
            if producer is None:
                raise NotConnected("KafkaBroker closed while a publish waited for room")
            try:
                producer.produce(name, body, headers.get(KEY_HEADER), headers=headers,
                                 on_delivery=partial(self._report, future))
                return
            except BufferError:
                if loop.time() > deadline:
                    raise BrokerConnectionError(
                        f"kafka: the producer queue stayed full for {self.delivery_timeout}s"
                    ) from None

    async def _ensure_topic(self, topic: str, *, inbox: bool = False,
                            partitions: int | None = None) -> str:
        """Create the Kafka topic of ``topic`` unless it exists; its name."""
        name = kafka_topic(topic)
        if self._admin is None:
            raise NotConnected("KafkaBroker is not connected (call connect(); closed?)")
        pending = self._creating.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._creating[name] = pending
            try:
                await self._create(name, inbox, partitions)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: only the callers waiting on it raise
                raise
            else:
                pending.set_result(None)
            finally:
                del self._creating[name]
        else:
            await asyncio.shield(pending)
        self._topics[topic] = name
        return name

    async def _create(self, name: str, inbox: bool, partitions: int | None) -> None:
        kafka, admin_module = _kafka(), _admin_module()
        config = dict(self.topic_config)
        if inbox:
            config["retention.ms"] = str(int(self.reply_retention * 1000))
        count = 1 if inbox else partitions or self.partitions
        new = admin_module.NewTopic(name, count,
                                    self.replication_factor, config=config)
        future = self._admin.create_topics([new], operation_timeout=10)[name]
        try:
            await asyncio.wrap_future(future)
        except kafka.KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if error is not None and error.code() == kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                return
            if error is not None and error.code() == kafka.KafkaError.INVALID_TOPIC_EXCEPTION:
                raise ValueError(f"kafka refused the topic name {name!r}: {error.str()}") \
                    from exc
            raise self._errors.translate(exc, f"create topic {name!r}") from exc

    # --- subscribing ----------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> KafkaSubscription:
        if self._producer is None:
            raise NotConnected("KafkaBroker is not connected (call connect(); closed?)")
        kafka = _kafka()
        wildcard = is_wildcard(pattern)
        if wildcard:
            regex: str | None = kafka_regex(pattern)
            topics: list[str] = []
        else:
            regex = None
            topics = [await self._ensure_topic(pattern, inbox=pattern.startswith(INBOX_PREFIX))]
        if pattern.startswith(INBOX_PREFIX):
            self._inboxes.add(pattern)
        config = dict(self._consumer_config)
        if group is None:
            config["group.id"] = f"amb-plain-{uuid.uuid4().hex}"  # never joined nor committed
        else:
            config["group.id"] = self.group_id(pattern, group)
        batch = max(64, min(1000, prefetch * 64))
        with self._errors.mapped(f"subscribe to {pattern!r}"):
            consumer = kafka.Consumer(config, logger=logger)
        sub = KafkaSubscription(
            consumer=consumer, kafka=kafka, pattern=pattern, topics=topics, regex=regex,
            group=group, handler=handler, buffer=max(4, prefetch * 4), batch=batch,
            metadata_refresh=self.metadata_refresh, on_closed=self._subscriptions.discard,
        )
        try:
            with self._errors.mapped(f"subscribe to {pattern!r}"):
                await sub.start(ready_timeout=max(10.0, 3 * self.session_timeout))
        except BaseException:
            await sub.close()
            raise
        self._subscriptions.add(sub)
        return sub

    @staticmethod
    def group_id(pattern: str, group: str) -> str:
        """The Kafka consumer group of amb group ``group`` on ``pattern``: ``group:pattern``
        (one Kafka group per subscription pattern, so groups on different topics never
        rebalance each other)."""
        return f"{group}:{pattern}"

    async def delete_group(self, pattern: str, group: str) -> None:
        if self._admin is None:
            raise NotConnected("KafkaBroker is not connected (call connect(); closed?)")
        kafka = _kafka()
        group_id = self.group_id(pattern, group)
        futures = self._admin.delete_consumer_groups([group_id], request_timeout=10)
        try:
            await asyncio.wrap_future(futures[group_id])
        except kafka.KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if error is not None and error.code() == kafka.KafkaError.GROUP_ID_NOT_FOUND:
                return
            raise self._errors.translate(exc, f"delete consumer group {group_id!r}") from exc

    # --- dead letters -----------------------------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        """Create the dead-letter topic now, with one partition (letters are read oldest
        first), so letters are kept before anyone subscribes; a group that subscribes later
        starts from its earliest offset, as every new group does."""
        if topic in self._dead_letter_topics:
            return
        await self._ensure_topic(topic, partitions=1)
        self._dead_letter_topics.add(topic)

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        raise UnsupportedFeature(
            f"Kafka cannot delete single records from {topic!r}: the letters stay in the topic "
            "until its retention (retention.ms) removes them; a consumer group reading it "
            "moves past them by committing its offset"
        )

    # --- replay -------------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        if self._admin is None:
            raise NotConnected("KafkaBroker is not connected (call connect(); closed?)")
        records = await asyncio.to_thread(self._read_log, topic, since)
        for delivery in records:
            yield delivery

    def _read_log(self, pattern: str, since: int | str | datetime | None) -> list[Delivery]:
        """Everything kept for ``pattern`` from ``since`` to the end offsets taken now, oldest
        first (by record timestamp, then partition and offset)."""
        kafka = _kafka()
        consumer = kafka.Consumer({**self._consumer_config,
                                   "group.id": f"amb-replay-{uuid.uuid4().hex}"},
                                  logger=logger)
        try:
            metadata = consumer.list_topics(timeout=10)
            if is_wildcard(pattern):
                names = [n for n in metadata.topics if matches(pattern, amb_topic(n))]
            else:
                name = kafka_topic(pattern)
                names = [name] if name in metadata.topics else []
            anchor: tuple[int, int] | None = None
            if isinstance(since, int):
                anchor = (0, since)
            elif isinstance(since, str):
                part, _, off = since.partition(":")
                anchor = (int(part), int(off)) if off else (0, int(part))
            starts: list[Any] = []
            ends: dict[tuple[str, int], int] = {}
            for name in names:
                for partition in metadata.topics[name].partitions:
                    tp = kafka.TopicPartition(name, partition)
                    low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                    start = low
                    if isinstance(since, datetime):
                        found = consumer.offsets_for_times(
                            [kafka.TopicPartition(name, partition,
                                                  int(since.timestamp() * 1000))], timeout=10)
                        start = found[0].offset if found[0].offset >= 0 else high
                    elif anchor is not None and anchor[0] == partition:
                        start = max(low, anchor[1])
                    if start < high:
                        starts.append(kafka.TopicPartition(name, partition, start))
                        ends[(name, partition)] = high
            if not starts:
                return []
            consumer.assign(starts)
            records: list[Any] = []
            remaining = dict(ends)
            while remaining:
                batch = consumer.consume(1000, 1.0)
                if not batch:
                    continue
                for record in batch:
                    if record.error() is not None:
                        continue
                    key = (record.topic(), record.partition())
                    end = remaining.get(key)
                    if end is None:
                        continue
                    if record.offset() < end:
                        records.append(record)
                    if record.offset() >= end - 1:
                        del remaining[key]
        finally:
            consumer.close()
        anchor_time = None
        if anchor is not None:
            for record in records:
                if record.partition() == anchor[0] and record.offset() == anchor[1]:
                    anchor_time = record.timestamp()[1]
                    break
        out = []
        records.sort(key=lambda r: (r.timestamp()[1], r.topic(), r.partition(), r.offset()))
        for record in records:
            if anchor is not None:
                if record.partition() == anchor[0]:
                    if record.offset() < anchor[1]:
                        continue
                elif anchor_time is not None and record.timestamp()[1] < anchor_time:
                    continue
            raw = record.headers()
            headers = {k: v.decode("utf-8", "replace") if v is not None else ""
                       for k, v in raw} if raw else {}
            key = record.key()
            if KEY_HEADER not in headers and key is not None:
                headers[KEY_HEADER] = key.decode("utf-8", "replace")
            out.append(Delivery(amb_topic(record.topic()), record.value() or b"", headers,
                                position=f"{record.partition()}:{record.offset()}"))
        return out
