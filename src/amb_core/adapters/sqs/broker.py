"""AWSSQSBroker: amb-core over Amazon SQS with SNS fan-out, on aiobotocore.

Mapping (docs/sqs.md has the reasons, the names and what stays behind on AWS):

- One SNS topic (``queue_name``, ``queue_name.fifo`` with ``use_fifo``) takes every publish,
  with the amb topic in the message attribute ``amb-topic`` and its number of segments in
  ``amb-depth``. Queues subscribe to it with raw message delivery and a filter policy.
- Consumer group: a durable queue per (group, pattern), kept when its members leave (so what
  is published meanwhile waits), deleted by :meth:`delete_group`.
- Plain subscription: a queue of its own, deleted (with its SNS subscription) on close.
- Wildcards: the filter policy matches the prefix before the first wildcard and the depth
  (``events.user.*`` is prefix ``events.user.`` at depth 3), so SNS delivers exactly the
  pattern's topics when wildcards come last; a ``*`` earlier is checked again on receipt.
- Envelope: structured CloudEvents JSON in the body (SQS allows 10 message attributes, the
  envelope has more, and a body must be text): a plain SQS consumer reads one JSON object.
- Dead letters: ``keep_dead_letters(topic)`` creates a keeper queue subscribed to the topic;
  a consumer group on that topic reads the keeper. Listing receives them with a visibility
  timeout and makes them visible again at once.
- Request/response: the bus's inbox topic is a reply queue per bus, written to directly
  (no SNS), created on first use and deleted on close.
- Large bodies: over the limit a ValueError, or with ``large_payload_bucket`` the body goes to
  S3 with the AWS extended clients' pointer (:mod:`.payloads`).
- Reconnect: HTTP has no connection to lose; a failed call marks the endpoint lost, and the
  runtime's :class:`Supervisor` probes it with backoff and restores the topic, the keepers and
  every subscription's queue (a restarted LocalStack or moto has forgotten them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from amb_core.adapters._client import require
from amb_core.adapters.sqs.batches import Batches
from amb_core.adapters.sqs.naming import (
    DEPTH_ATTRIBUTE,
    ENCODING_ATTRIBUTE,
    FIFO_SUFFIX,
    TOPIC_ATTRIBUTE,
    check_base,
    depth,
    filter_policy,
    queue_name,
)
from amb_core.adapters.sqs.payloads import LargePayloads
from amb_core.adapters.sqs.subscriptions import SYSTEM_ATTRIBUTES, Subscription
from amb_core.broker import (
    INBOX_PREFIX,
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
)
from amb_core.errors import AmbError, BrokerConnectionError, NotConnected
from amb_core.runtime import ErrorMap, ReconnectPolicy, Supervisor
from amb_core.topics import is_wildcard, validate_pattern, validate_topic

if TYPE_CHECKING:
    from amb_core.runtime.errors import Mapping

logger = logging.getLogger(__name__)

SNS_LIMIT = 262_144
"""SNS takes messages of at most 256 KiB (body and attributes), every publish goes through it."""
SQS_LIMIT = 1_048_576
"""SQS takes 1 MiB (since August 2025): replies, written to the reply queue directly."""
ATTRIBUTE_RESERVE = 2_048
"""What ``max_payload`` leaves for the message attributes under the service's limit."""
MAX_ATTRIBUTES = 10
_ATTRIBUTE_NAME = re.compile(r"(?!\.)(?!.*\.\.)(?!(?i:aws\.|amazon\.))[A-Za-z0-9_.-]{1,256}(?<!\.)")
_FIFO_ID = re.compile(r"[!-~]{1,128}")
_ENVELOPE_HEAD = b'{"specversion"'
_NOT_FOUND = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound",
              "NotFoundException")


def _error_map() -> Mapping:
    from botocore import exceptions as e

    return (
        ((e.EndpointConnectionError, e.ConnectionClosedError, e.ConnectTimeoutError,
          e.ReadTimeoutError, e.HTTPClientError, ConnectionError, OSError),
         BrokerConnectionError),
        ((e.ClientError, e.BotoCoreError), AmbError),
    )


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    error = response.get("Error") or {}
    return str(error.get("Code", "")) or str(error.get("QueryErrorCode", ""))


def _fifo_id(text: str) -> str:
    if _FIFO_ID.fullmatch(text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()


class AWSSQSBroker(Broker):
    """SQS queues behind one SNS topic.

    ``queue_name``: prefixes every queue made here and names the SNS topic (1-40 characters of
    letters, digits, ``-``, ``_``). ``use_fifo``: FIFO topic and queues; ``MessageGroupId`` is
    the message's key (``Message.key``) or else its topic, the deduplication id its id.
    ``high_throughput``: FIFO queues with ``DeduplicationScope=messageGroup`` and
    ``FifoThroughputLimit=perMessageGroupId``. ``endpoint_url``: LocalStack, ElasticMQ, moto.
    ``visibility_timeout``: seconds a received message stays invisible; the lease keeper extends
    it while a handler runs (up to SQS's 12 h). ``wait_time_seconds``: long polling (0-20).
    ``large_payload_bucket``: bodies over the limit go to this S3 bucket (AWS extended-client
    pointer); ``large_payload_threshold``: the body size above which they do (default: what
    the path takes). ``dead_letter_queue``: a queue name; group queues get a redrive policy to
    it after ``max_receive_count`` receives (crash loops the bus never sees). ``reconnect``: the
    runtime's :class:`ReconnectPolicy`. ``client_options``: more ``create_client`` arguments
    (``aws_access_key_id`` ... : by default the standard AWS credential chain).
    """

    header_prefix = "ce-"

    def __init__(
        self,
        region_name: str = "us-east-1",
        queue_name: str = "amb-messages",
        use_fifo: bool = False,
        endpoint_url: str | None = None,
        *,
        high_throughput: bool = False,
        visibility_timeout: int = 30,
        wait_time_seconds: int = 20,
        listing_wait_seconds: int = 1,
        large_payload_bucket: str | None = None,
        large_payload_threshold: int | None = None,
        dead_letter_queue: str | None = None,
        max_receive_count: int = 10,
        max_pool_connections: int = 256,
        reconnect: ReconnectPolicy | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= wait_time_seconds <= 20:
            raise ValueError("wait_time_seconds must be 0-20 (SQS long polling)")
        if not 1 <= visibility_timeout <= 43_200:
            raise ValueError("visibility_timeout must be 1-43200 seconds")
        if high_throughput and not use_fifo:
            raise ValueError("high_throughput applies to FIFO queues: set use_fifo=True")
        self.region_name = region_name
        self.queue_name = check_base(queue_name)
        self.use_fifo = use_fifo
        self.endpoint_url = endpoint_url
        self.high_throughput = high_throughput
        self.visibility_timeout = visibility_timeout
        self.wait_time_seconds = wait_time_seconds
        self.listing_wait_seconds = listing_wait_seconds
        self.large_payload_bucket = large_payload_bucket
        self.dead_letter_queue = dead_letter_queue
        self.max_receive_count = max_receive_count
        self.max_pool_connections = max_pool_connections
        self.reconnect = reconnect or ReconnectPolicy()
        self.client_options = dict(client_options or {})
        limit = SNS_LIMIT - ATTRIBUTE_RESERVE
        self.large_payload_threshold = large_payload_threshold or limit
        self.capabilities = Capabilities(
            wildcards=True,
            consumer_groups=True,
            persistent=True,
            redelivers_unacked=True,
            replay=False,
            ordering=use_fifo,
            at_least_once=True,
            headers=False,
            native_request_reply=False,
            reconnect=True,
            max_payload=None if large_payload_bucket else limit,
            ordering_keys=use_fifo,
        )
        self.topic_name = queue_name + (FIFO_SUFFIX if use_fifo else "")
        self.topic_arn = ""
        self.sqs: Any = None
        self.sns: Any = None
        self.payloads: LargePayloads | None = None
        self._errors = ErrorMap("SQS", _error_map)
        self._stack: contextlib.AsyncExitStack | None = None
        self._supervisor: Supervisor | None = None
        self._lost = asyncio.Event()
        self._subscriptions: set[Subscription] = set()
        self._kept: set[str] = set()
        self._urls: dict[str, str] = {}
        self._sns_batches = Batches(self._send_batch, self._refused, max_bytes=SNS_LIMIT,
                                   ordered=use_fifo)
        self._sqs_batches = Batches(self._send_batch, self._refused, max_bytes=SQS_LIMIT)
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._connection_errors: tuple[type[BaseException], ...] = ()
        self._dlq_arn: str | None = None

    def __repr__(self) -> str:
        return (f"AWSSQSBroker(region_name={self.region_name!r}, queue_name={self.queue_name!r}, "
                f"use_fifo={self.use_fifo}, endpoint_url={self.endpoint_url!r})")

    @classmethod
    def from_url(cls, url: str) -> AWSSQSBroker:
        """``sqs://REGION/QUEUE?fifo=true&endpoint_url=http://127.0.0.1:5000`` (also
        ``large_payload_bucket``, ``visibility_timeout``, ``wait_time_seconds``,
        ``high_throughput``, ``dead_letter_queue``); credentials never go in the URL."""
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}

        def flag(name: str) -> bool:
            return query.get(name, "").lower() in ("1", "true", "yes", "on")

        options: dict[str, Any] = {}
        for name in ("visibility_timeout", "wait_time_seconds"):
            if name in query:
                options[name] = int(query[name])
        for name in ("large_payload_bucket", "dead_letter_queue"):
            if name in query:
                options[name] = query[name]
        return cls(
            region_name=parts.hostname or "us-east-1",
            queue_name=parts.path.strip("/") or "amb-messages",
            use_fifo=flag("fifo"),
            endpoint_url=query.get("endpoint_url"),
            high_throughput=flag("high_throughput"),
            **options,
        )

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._supervisor is not None and self._supervisor.running:
            return
        require("aiobotocore", "aws")
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore import exceptions as e

        self._connection_errors = (e.EndpointConnectionError, e.ConnectionClosedError,
                                   e.ConnectTimeoutError, e.ReadTimeoutError, e.HTTPClientError,
                                   ConnectionError, OSError)
        self._closed = False
        self._close_task = None
        config = AioConfig(
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.reconnect.connect_timeout,
            read_timeout=self.wait_time_seconds + 15,
            retries={"mode": "standard", "max_attempts": 3},
        )
        session = get_session()
        stack = self._stack = contextlib.AsyncExitStack()
        options = dict(region_name=self.region_name, endpoint_url=self.endpoint_url,
                       config=config, **self.client_options)
        self.sqs = await stack.enter_async_context(session.create_client("sqs", **options))
        self.sns = await stack.enter_async_context(session.create_client("sns", **options))
        if self.large_payload_bucket:
            s3 = await stack.enter_async_context(session.create_client("s3", **options))
            self.payloads = LargePayloads(s3, self.large_payload_bucket)
        supervisor = self._supervisor = Supervisor(
            f"SQS/SNS at {self.endpoint_url or self.region_name}",
            open=self._open, until_lost=self._until_lost, policy=self.reconnect,
            errors=self._connection_errors,
        )
        try:
            with self._errors.mapped("connect"):
                await supervisor.start()
        except BaseException:
            self._supervisor = None
            await stack.aclose()
            raise

    async def _open(self) -> None:
        """Probe the endpoint (the topic, made if missing) and restore what this broker made."""
        attributes = {"FifoTopic": "true", "ContentBasedDeduplication": "false"} \
            if self.use_fifo else {}
        response = await self.sns.create_topic(Name=self.topic_name, Attributes=attributes)
        self.topic_arn = response["TopicArn"]
        self._urls.clear()
        self._lost = asyncio.Event()
        if self.dead_letter_queue:
            self._dlq_arn = await self._ensure_dead_letter_queue()
        for topic in sorted(self._kept):
            await self._ensure_keeper(topic)
        for sub in list(self._subscriptions):
            await self.prepare(sub)

    async def _until_lost(self) -> None:
        await self._lost.wait()

    def lost(self, exc: BaseException) -> None:
        """A call failed on the connection (or found its queue gone): reconnect and restore."""
        if not self._lost.is_set():
            logger.debug("SQS: marking the endpoint lost: %r", exc)
        self._lost.set()
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.ready.clear()

    async def ready(self) -> None:
        supervisor = self._supervisor
        if supervisor is None or supervisor.ready.is_set():
            return
        await supervisor.ready.wait()

    def _broken(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the endpoint or what we made on it is gone."""
        return isinstance(exc, self._connection_errors) or _code(exc) in _NOT_FOUND

    async def receive_failed(self, sub: Subscription, exc: BaseException) -> None:
        if self._broken(exc):
            self.lost(exc)
            await asyncio.sleep(0)
            return
        logger.warning("receiving from %s failed: %s; retrying in 1 s", sub.queue,
                       self._errors.translate(exc, "receive"))
        await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closed = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.close()
        for sub in list(self._subscriptions):
            await sub.close()
        await self._sns_batches.close()
        await self._sqs_batches.close()
        stack, self._stack = self._stack, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _connected(self) -> None:
        supervisor = self._supervisor
        if supervisor is None or self._closed:
            raise NotConnected("the SQS broker is not connected (call connect(); or it closed)")
        if not supervisor.ready.is_set():
            await supervisor.wait_ready()

    def _raise(self, exc: BaseException, what: str) -> None:
        if self._broken(exc):
            self.lost(exc)
        mapped = self._errors.translate(exc, what)
        if isinstance(mapped, AmbError) and not isinstance(mapped, BrokerConnectionError) \
                and _code(exc) in _NOT_FOUND:
            mapped = BrokerConnectionError(f"SQS: {what} failed: {exc}; restoring")
        if mapped is exc:
            raise exc
        raise mapped from exc

    # --- queues ----------------------------------------------------------------------------

    def _queue_arn(self, name: str) -> str:
        _, partition, _, _, account, _ = self.topic_arn.split(":", 5)
        return f"arn:{partition}:sqs:{self.region_name}:{account}:{name}"

    def group_queue_name(self, group: str, pattern: str) -> str:
        return queue_name(self.queue_name, "group", group, pattern, fifo=self.use_fifo)

    def keeper_queue_name(self, topic: str) -> str:
        return queue_name(self.queue_name, "keeper", topic, fifo=self.use_fifo)

    async def _create_queue(self, name: str, kind: str, *, fed: bool) -> str:
        attributes = {"VisibilityTimeout": str(self.visibility_timeout)}
        if name.endswith(FIFO_SUFFIX):
            attributes["FifoQueue"] = "true"
            if self.high_throughput:
                attributes["DeduplicationScope"] = "messageGroup"
                attributes["FifoThroughputLimit"] = "perMessageGroupId"
        if kind == "inbox":
            attributes["MessageRetentionPeriod"] = "300"
        if fed:
            attributes["Policy"] = orjson.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": self._queue_arn(name),
                    "Condition": {"ArnEquals": {"aws:SourceArn": self.topic_arn}},
                }],
            }).decode()
        if kind == "group" and self._dlq_arn is not None:
            attributes["RedrivePolicy"] = orjson.dumps({
                "deadLetterTargetArn": self._dlq_arn, "maxReceiveCount": self.max_receive_count,
            }).decode()
        tags = {"amb-kind": kind, "amb-created": str(int(time.time()))}
        try:
            response = await self.sqs.create_queue(QueueName=name, Attributes=attributes,
                                                   tags=tags)
        except Exception as exc:
            if _code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            logger.info("SQS queue %s exists with other attributes; using it as it is", name)
            response = await self.sqs.get_queue_url(QueueName=name)
        url: str = response["QueueUrl"]
        return url

    async def _subscribe_queue(self, name: str, pattern: str) -> str:
        response = await self.sns.subscribe(
            TopicArn=self.topic_arn, Protocol="sqs", Endpoint=self._queue_arn(name),
            Attributes={"RawMessageDelivery": "true",
                        "FilterPolicy": orjson.dumps(filter_policy(pattern)).decode()},
            ReturnSubscriptionArn=True,
        )
        arn: str = response["SubscriptionArn"]
        return arn

    async def _ensure_keeper(self, topic: str) -> str:
        name = self.keeper_queue_name(topic)
        url = await self._create_queue(name, "keeper", fed=True)
        await self._subscribe_queue(name, topic)
        return url

    async def _ensure_dead_letter_queue(self) -> str:
        assert self.dead_letter_queue is not None
        name = self.dead_letter_queue
        if self.use_fifo and not name.endswith(FIFO_SUFFIX):
            name += FIFO_SUFFIX
        await self._create_queue(name, "redrive", fed=False)
        return self._queue_arn(name)

    async def prepare(self, sub: Subscription) -> None:
        """Create ``sub``'s queue (and SNS subscription) unless they exist."""
        if sub.kind == "inbox":
            sub.url = await self._create_queue(sub.queue, "inbox", fed=False)
            return
        if sub.kind == "keeper":
            sub.url = await self._ensure_keeper(sub.pattern)
            return
        sub.url = await self._create_queue(sub.queue, sub.kind, fed=True)
        sub.subscription_arn = await self._subscribe_queue(sub.queue, sub.pattern)

    def forget(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    async def remove(self, sub: Subscription) -> None:
        """A closed subscription's own queue goes (plain, inbox); groups' and keepers' stay."""
        if sub.kind == "plain" and sub.subscription_arn:
            await self.sns.unsubscribe(SubscriptionArn=sub.subscription_arn)
        if sub.kind in ("plain", "inbox") and sub.url:
            await self.sqs.delete_queue(QueueUrl=sub.url)

    async def _queue_url(self, name: str) -> str | None:
        url = self._urls.get(name)
        if url is not None:
            return url
        try:
            response = await self.sqs.get_queue_url(QueueName=name)
        except Exception as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise
        url = str(response["QueueUrl"])
        if len(self._urls) > 4096:
            self._urls.clear()
        self._urls[name] = url
        return url

    # --- publish ---------------------------------------------------------------------------

    def _attributes(self, topic: str, headers: dict[str, str]) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": topic},
            DEPTH_ATTRIBUTE: {"DataType": "Number", "StringValue": str(depth(topic))},
        }
        if headers:
            if len(headers) + 3 > MAX_ATTRIBUTES:
                raise ValueError(
                    f"{len(headers)} headers is over what SQS message attributes take here "
                    f"({MAX_ATTRIBUTES - 3}); send them inside the body (the bus does)"
                )
            for name, value in headers.items():
                if not _ATTRIBUTE_NAME.fullmatch(name):
                    raise ValueError(f"header {name!r} is not a valid SQS attribute name")
                attributes[name] = {"DataType": "String", "StringValue": value}
        return attributes

    @staticmethod
    def _size(text: str, attributes: dict[str, Any]) -> int:
        size = len(text) if text.isascii() else len(text.encode())
        for name, value in attributes.items():
            size += len(name) + len(value["DataType"]) + len(value["StringValue"].encode())
        return size

    async def _body(self, body: bytes, attributes: dict[str, Any], limit: int,
                    where: str) -> str:
        too_big = len(body) > self.large_payload_threshold or len(body) > limit - 512
        if too_big and self.payloads is not None:
            pointer, extra = await self.payloads.store(body)
            attributes.update(extra)
            return pointer
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text = base64.b64encode(body).decode("ascii")
            attributes[ENCODING_ATTRIBUTE] = {"DataType": "String", "StringValue": "base64"}
        size = self._size(text, attributes)
        if size > limit:
            raise ValueError(
                f"message of {size} bytes (body and attributes) is over {where}'s limit of "
                f"{limit} bytes; give AWSSQSBroker a large_payload_bucket to send it via S3"
            )
        return text

    def _fifo_fields(self, topic: str, body: bytes, headers: dict[str, str],
                     entry: dict[str, Any]) -> None:
        key = headers.get("ce-partitionkey")
        message_id = headers.get("ce-id")
        if (key is None or message_id is None) and body.startswith(_ENVELOPE_HEAD):
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                key = key or event.get("partitionkey")
                message_id = message_id or event.get("id")
        entry["MessageGroupId"] = _fifo_id(key if isinstance(key, str) and key else topic)
        entry["MessageDeduplicationId"] = _fifo_id(
            message_id if isinstance(message_id, str) and message_id else uuid.uuid4().hex)

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        if self._closed or self._supervisor is None or not self._supervisor.ready.is_set():
            await self._connected()
        if topic.startswith(INBOX_PREFIX):
            await self._send_direct(topic, body, headers)
            return
        try:
            attributes = self._attributes(topic, headers)
            text = await self._body(body, attributes, SNS_LIMIT, "SNS")
            entry: dict[str, Any] = {"Message": text, "MessageAttributes": attributes}
            if self.use_fifo:
                self._fifo_fields(topic, body, headers, entry)
            await self._sns_batches.send(self.topic_arn, entry, self._size(text, attributes))
        except (ValueError, AmbError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._raise(exc, f"publish to {topic!r}")

    async def _send_direct(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """A reply to a bus's inbox: straight to its reply queue (no SNS, 1 MiB)."""
        validate_topic(topic)
        try:
            url = await self._queue_url(queue_name(self.queue_name, "inbox",
                                                   topic[len(INBOX_PREFIX):]))
            if url is None:
                logger.debug("dropped a message to %s: its reply queue is gone", topic)
                return
            attributes = self._attributes(topic, headers)
            text = await self._body(body, attributes, SQS_LIMIT, "SQS")
            entry = {"MessageBody": text, "MessageAttributes": attributes}
            await self._sqs_batches.send(url, entry, self._size(text, attributes))
        except (ValueError, AmbError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._raise(exc, f"reply to {topic!r}")

    async def _send_batch(self, destination: str, entries: list[dict[str, Any]]) -> Any:
        if destination.startswith("arn:"):
            return await self.sns.publish_batch(TopicArn=destination,
                                                PublishBatchRequestEntries=entries)
        return await self.sqs.send_message_batch(QueueUrl=destination, Entries=entries)

    @staticmethod
    def _refused(destination: str, failed: dict[str, Any]) -> BaseException:
        text = f"{failed.get('Code')}: {failed.get('Message')}"
        if "too long" in text.lower() or "size" in text.lower():
            return ValueError(f"SQS/SNS refused the message as over its limit: {text}")
        return AmbError(f"SQS/SNS refused a message to {destination}: {text}")

    # --- subscribe -------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        validate_pattern(pattern)
        await self._connected()
        if pattern.startswith(INBOX_PREFIX):
            kind, queue = "inbox", queue_name(self.queue_name, "inbox",
                                              pattern[len(INBOX_PREFIX):])
        elif group is None:
            kind, queue = "plain", queue_name(self.queue_name, "plain", uuid.uuid4().hex[:16],
                                              fifo=self.use_fifo)
        elif not is_wildcard(pattern) and await self._kept_elsewhere(pattern):
            kind, queue = "keeper", self.keeper_queue_name(pattern)
        else:
            kind, queue = "group", self.group_queue_name(group, pattern)
        sub = Subscription(self, pattern, handler, group, prefetch, kind, queue)
        try:
            with self._errors.mapped(f"subscribe to {pattern!r}"):
                await sub.start()
        except BaseException:
            await sub.close()
            raise
        self._subscriptions.add(sub)
        return sub

    async def _kept_elsewhere(self, topic: str) -> bool:
        if topic in self._kept:
            return True
        with self._errors.mapped(f"looking for the keeper of {topic!r}"):
            return await self._queue_url(self.keeper_queue_name(topic)) is not None

    # --- visibility and deletes (the subscriptions' lease keepers and ack batchers) --------

    async def change_visibility(self, url: str, changes: list[tuple[str, int]]) -> None:
        for start in range(0, len(changes), 10):
            entries = [{"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": timeout}
                       for i, (receipt, timeout) in enumerate(changes[start:start + 10])]
            response = await self.sqs.change_message_visibility_batch(QueueUrl=url,
                                                                      Entries=entries)
            for failed in response.get("Failed") or ():
                logger.debug("SQS refused a visibility change on %s: %s", url, failed)

    async def delete_receipts(self, url: str, receipts: list[str]) -> None:
        for start in range(0, len(receipts), 10):
            entries = [{"Id": str(i), "ReceiptHandle": receipt}
                       for i, receipt in enumerate(receipts[start:start + 10])]
            response = await self.sqs.delete_message_batch(QueueUrl=url, Entries=entries)
            for failed in response.get("Failed") or ():
                logger.warning("SQS refused to delete a message on %s (it may come back): %s",
                               url, failed)

    # --- dead letters and groups -----------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        """A keeper queue subscribed to ``topic`` (restored after a reconnect): letters wait
        there from the first one, whether or not anyone subscribes."""
        validate_topic(topic)
        await self._connected()
        with self._errors.mapped(f"keeping the dead letters of {topic!r}"):
            await self._ensure_keeper(topic)
        self._kept.add(topic)

    async def _take_all(self, url: str) -> list[dict[str, Any]]:
        """Receive every message of ``url`` (they stay invisible for the visibility timeout),
        oldest first by sent time (and FIFO sequence number)."""
        taken: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            response = await self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=self.listing_wait_seconds,
                VisibilityTimeout=max(self.visibility_timeout, 30),
                MessageSystemAttributeNames=SYSTEM_ATTRIBUTES, MessageAttributeNames=["All"],
            )
            messages = response.get("Messages")
            if not messages:
                break
            for message in messages:
                if message["MessageId"] not in seen:
                    seen.add(message["MessageId"])
                    taken.append(message)

        def order(message: dict[str, Any]) -> tuple[int, int]:
            attributes = message.get("Attributes") or {}
            return (int(attributes.get("SentTimestamp", 0)),
                    int(attributes.get("SequenceNumber", 0)))

        taken.sort(key=order)
        return taken

    async def dead_letters(self, topic: str) -> AsyncIterator[Delivery]:
        """The letters in ``topic``'s keeper queue, oldest first. SQS has no peek: they are
        received with a visibility timeout and made visible again right after, so while they
        are listed (a moment) a consumer of the keeper does not see them, and each listing
        counts one receive. ``position`` is the SQS message id."""
        validate_topic(topic)
        await self._connected()
        letters: list[Delivery] = []
        with self._errors.mapped(f"listing the dead letters of {topic!r}"):
            url = await self._queue_url(self.keeper_queue_name(topic))
            if url is None:
                return
            taken = await self._take_all(url)
            await self.change_visibility(url, [(m["ReceiptHandle"], 0) for m in taken])
        for message in taken:
            letters.append(self._listed(topic, message))
        for letter in letters:
            yield letter

    @staticmethod
    def _listed(topic: str, message: dict[str, Any]) -> Delivery:
        attributes = message.get("MessageAttributes") or {}
        headers = {name: value["StringValue"] for name, value in attributes.items()
                   if name not in (TOPIC_ATTRIBUTE, DEPTH_ATTRIBUTE) and "StringValue" in value}
        return Delivery(topic, message["Body"].encode(), headers, position=message["MessageId"])

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        """Delete the letters whose SQS message ids are ``positions``: the keeper is received
        again, those are deleted by their new receipt handles, the others made visible again.
        A letter a consumer holds at that moment is not found (and not counted)."""
        wanted = {str(position) for position in positions}
        if not wanted:
            return 0
        await self._connected()
        with self._errors.mapped(f"removing dead letters of {topic!r}"):
            url = await self._queue_url(self.keeper_queue_name(topic))
            if url is None:
                return 0
            taken = await self._take_all(url)
            doomed = [m["ReceiptHandle"] for m in taken if m["MessageId"] in wanted]
            others = [(m["ReceiptHandle"], 0) for m in taken if m["MessageId"] not in wanted]
            await self.delete_receipts(url, doomed)
            await self.change_visibility(url, others)
        return len(doomed)

    async def delete_group(self, pattern: str, group: str) -> None:
        """Delete the group's queue (with what waits in it) and its SNS subscription. A group
        on a kept dead-letter topic reads the keeper, which stays."""
        validate_pattern(pattern)
        await self._connected()
        name = self.group_queue_name(group, pattern)
        with self._errors.mapped(f"deleting group {group!r} on {pattern!r}"):
            url = await self._queue_url(name)
            endpoint = self._queue_arn(name)
            paginator = self.sns.get_paginator("list_subscriptions_by_topic")
            async for page in paginator.paginate(TopicArn=self.topic_arn):
                for subscription in page.get("Subscriptions", ()):
                    if subscription.get("Endpoint") == endpoint:
                        await self.sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
            if url is not None:
                await self.sqs.delete_queue(QueueUrl=url)
                self._urls.pop(name, None)
