"""AzureServiceBusBroker: amb-core over Azure Service Bus, on ``azure.servicebus.aio``.

Mapping (docs/azure.md has the reasons):

- One Service Bus topic (``topic_name``) carries every amb topic; the amb topic travels in the
  application property ``amb_topic`` (:mod:`.rules`).
- A plain subscriber gets its own subscription (deleted when it unsubscribes, and by the service
  after ``plain_idle_delete`` idle seconds if the process dies); a consumer group is a durable
  subscription named from (group, pattern) that its members read together. Each subscription
  has one rule: a correlation filter for an exact topic, a SQL ``LIKE`` filter for a wildcard.
- PEEK_LOCK receive, complete after the handler, abandon for retries (the service counts
  deliveries), lock renewal while handlers run (:mod:`.subscriptions`).
- Envelope: the CloudEvents AMQP binding with the ``cloudEvents_`` prefix as application
  properties; the content type as the message's ``content_type``; the id as its
  ``message_id``; ``Message.key`` as its ``session_id``.
- Dead letters: ``keep_dead_letters(topic)`` makes a durable keeper subscription for that amb
  topic; consumer groups on a kept topic read the keeper, ``dead_letters`` peeks it,
  ``remove_dead_letters`` receives and completes the named letters.
- Request/reply: the bus's reply inbox is a plain subscription of its own (one per bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from amb_core.adapters._client import require
from amb_core.adapters.azure.rules import (
    DEFAULT_RULE,
    RULE_NAME,
    TOPIC_PROPERTY,
    group_subscription_name,
    keeper_subscription_name,
    plain_subscription_name,
    sql_filter,
)
from amb_core.adapters.azure.subscriptions import (
    Subscription,
    message_body,
    message_headers,
)
from amb_core.broker import (
    INBOX_PREFIX,
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
)
from amb_core.errors import AmbError, BrokerConnectionError, MissingDependency, NotConnected
from amb_core.runtime import ErrorMap, ReconnectPolicy
from amb_core.topics import is_wildcard, validate_pattern

if TYPE_CHECKING:
    from amb_core.runtime.errors import Mapping

logger = logging.getLogger(__name__)

PREFIX = "cloudEvents_"
ID = PREFIX + "id"
PARTITION_KEY = PREFIX + "partitionkey"
CONTENT_TYPE = "content-type"
STANDARD_MAX_MESSAGE = 256 * 1024
"""The Standard tier's message size (body and properties); Premium takes up to 100 MB."""
_KEY = re.compile(r"(SharedAccessKey=|SharedAccessSignature=)[^;]*", re.IGNORECASE)
_PEEK_PAGE = 100


def mask_connection_string(text: str) -> str:
    """The connection string with its key (or SAS token) replaced by ``***``."""
    return _KEY.sub(r"\1***", text)


def _error_map() -> Mapping:
    from azure.core import exceptions as core
    from azure.servicebus import exceptions as e

    return (
        (e.MessageSizeExceededError, ValueError),
        ((e.ServiceBusConnectionError, e.ServiceBusCommunicationError, e.OperationTimeoutError,
          e.ServiceBusServerBusyError, e.ServiceBusAuthenticationError,
          e.ServiceBusAuthorizationError, core.ClientAuthenticationError,
          core.ServiceRequestError, core.ServiceResponseError, OSError), BrokerConnectionError),
        ((e.ServiceBusError, core.AzureError), AmbError),
    )


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


class AzureServiceBusBroker(Broker):
    """Azure Service Bus through one topic.

    Sign in with ``connection_string`` (a namespace's, or one with ``EntityPath`` naming the
    topic), or with ``fully_qualified_namespace`` and an azure-identity ``credential``.
    ``topic_name``: the Service Bus topic carrying every amb topic (made at connect when
    ``manage``). ``manage``: create the topic, subscriptions and rules through the
    administration client (needs Manage rights); False uses what exists (docs/azure.md says
    what to create). ``max_payload``: the tier's message size in bytes (Standard 256 KB,
    Premium up to 100 MB); a larger message (body and properties) is refused with ValueError
    before it is sent. ``lock_duration``: seconds a received message stays locked (subscriptions
    made here; at most 300); locks are renewed every third of it while handlers run.
    ``plain_idle_delete``: seconds after which the service deletes a plain subscriber's
    subscription left idle (at least 300). ``group_idle_delete``: the same for consumer-group
    and dead-letter keeper subscriptions (None: kept until deleted). ``max_delivery_count``:
    deliveries after which the service moves a message to the subscription's own dead-letter
    queue (crash loops). ``plain_prefetch``: messages a plain subscription reads per receive
    call. ``receive_wait``: seconds one receive call waits for messages. ``reconnect``: the
    runtime's :class:`ReconnectPolicy` (``connect_timeout`` bounds connect and each admin
    call; the backoff paces reopening a receiver). ``client_factory`` / ``admin_factory``: make
    the ``ServiceBusClient`` and ``ServiceBusAdministrationClient`` (tests inject fakes here;
    default: the SDK's, from the sign-in options).
    """

    header_prefix = PREFIX

    def __init__(
        self,
        connection_string: str | None = None,
        topic_name: str = "amb-messages",
        *,
        fully_qualified_namespace: str | None = None,
        credential: Any = None,
        manage: bool = True,
        max_payload: int = STANDARD_MAX_MESSAGE,
        lock_duration: float = 60.0,
        plain_idle_delete: float = 300.0,
        group_idle_delete: float | None = None,
        max_delivery_count: int = 100,
        plain_prefetch: int = 64,
        receive_wait: float = 5.0,
        reconnect: ReconnectPolicy | None = None,
        client_factory: Callable[[], Any] | None = None,
        admin_factory: Callable[[], Any] | None = None,
    ) -> None:
        if connection_string is None and fully_qualified_namespace is None:
            raise ValueError("pass connection_string, or fully_qualified_namespace and credential")
        if connection_string is not None and fully_qualified_namespace is not None:
            raise ValueError("pass connection_string or fully_qualified_namespace, not both")
        if fully_qualified_namespace is not None and credential is None:
            raise ValueError("fully_qualified_namespace needs a credential "
                             "(e.g. azure.identity.aio.DefaultAzureCredential())")
        if connection_string is not None:
            entity = _entity_path(connection_string)
            if entity:
                topic_name = entity
        if not 0 < lock_duration <= 300:
            raise ValueError("lock_duration must be in (0, 300] seconds (the service's limit)")
        if plain_idle_delete < 300:
            raise ValueError("plain_idle_delete must be at least 300 s (the service's minimum)")
        if group_idle_delete is not None and group_idle_delete < 300:
            raise ValueError("group_idle_delete must be None or at least 300 s")
        if max_payload < 1024 or max_delivery_count < 1 or plain_prefetch < 1:
            raise ValueError("need max_payload >= 1024, max_delivery_count >= 1, "
                             "plain_prefetch >= 1")
        if not topic_name or len(topic_name) > 260:
            raise ValueError("topic_name must be a Service Bus topic name")
        self.connection_string = connection_string
        self.fully_qualified_namespace = fully_qualified_namespace
        self.credential = credential
        self.topic_name = topic_name
        self.manage = manage
        self.max_payload = max_payload
        self.lock_duration = lock_duration
        self.plain_idle_delete = plain_idle_delete
        self.group_idle_delete = group_idle_delete
        self.max_delivery_count = max_delivery_count
        self.plain_prefetch = plain_prefetch
        self.receive_wait = receive_wait
        self.reconnect = reconnect or ReconnectPolicy()
        self.capabilities = Capabilities(
            wildcards=True,
            consumer_groups=True,
            persistent=True,
            redelivers_unacked=True,
            replay=False,
            ordering=True,
            at_least_once=True,
            headers=True,
            native_request_reply=False,
            reconnect=True,
            max_payload=max_payload,
            ordering_keys=False,
        )
        self.errors = ErrorMap("Azure Service Bus", _error_map)
        self._client_factory = client_factory
        self._admin_factory = admin_factory
        self._sb: Any = None
        self._client: Any = None
        self._admin: Any = None
        self._sender: Any = None
        self._message_class: Any = None
        self._common: Any = None
        self._subscriptions: set[Subscription] = set()
        self._kept: set[str] = set()
        self._close_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        where = (f"connection_string={mask_connection_string(self.connection_string)!r}"
                 if self.connection_string is not None
                 else f"fully_qualified_namespace={self.fully_qualified_namespace!r}")
        return f"AzureServiceBusBroker({where}, topic_name={self.topic_name!r})"

    @property
    def _where(self) -> str:
        if self.fully_qualified_namespace is not None:
            return self.fully_qualified_namespace
        assert self.connection_string is not None
        match = re.search(r"Endpoint=sb://([^/;]+)", self.connection_string, re.IGNORECASE)
        return match.group(1) if match else "the namespace"

    @classmethod
    def from_url(cls, url: str) -> AzureServiceBusBroker:
        """``azuresb://<key name>:<key>@<namespace host>/<topic>`` (the key URL-encoded),
        ``azuresb://<namespace host>/<topic>`` (signs in with azure-identity's
        ``DefaultAzureCredential``), or ``azuresb://Endpoint=sb://...;SharedAccessKey=...``
        (a whole connection string after the scheme). Query parameters: ``manage`` (0/1),
        ``max_payload`` (bytes), ``emulator=1`` (the local emulator's
        ``UseDevelopmentEmulator=true``)."""
        rest = url.split("://", 1)[1]
        if rest.lower().startswith("endpoint="):
            return cls(connection_string=rest)
        parts = urlsplit(url)
        options: dict[str, Any] = {}
        emulator = False
        for key, value in parse_qsl(parts.query):
            if key == "manage":
                options["manage"] = value.lower() not in ("0", "false", "no", "off")
            elif key == "max_payload":
                options["max_payload"] = int(value)
            elif key == "emulator":
                emulator = value.lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError(f"unknown azuresb:// query parameter {key!r}")
        topic = parts.path.strip("/") or "amb-messages"
        host = parts.hostname or ""
        if not host:
            raise ValueError("an azuresb:// URL names the namespace host")
        if parts.username is not None:
            port = f":{parts.port}" if parts.port else ""
            endpoint = f"Endpoint=sb://{host}{port}/;"
            connection = (f"{endpoint}SharedAccessKeyName={unquote(parts.username)};"
                          f"SharedAccessKey={unquote(parts.password or '')}")
            if emulator:
                connection += ";UseDevelopmentEmulator=true"
            return cls(connection_string=connection, topic_name=topic, **options)
        try:
            import azure.identity.aio as identity
        except ImportError as exc:
            raise MissingDependency(
                "azuresb:// without a key signs in with azure-identity's DefaultAzureCredential; "
                "run: pip install azure-identity (or put the key in the URL)") from exc
        return cls(fully_qualified_namespace=host, credential=identity.DefaultAzureCredential(),
                   topic_name=topic, **options)

    # --- the SDK's objects -------------------------------------------------------------------

    def _load(self) -> None:
        """Import the SDK (MissingDependency naming the extra when it is absent)."""
        self._sb = require("azure.servicebus.aio", "azure")
        self._common = require("azure.servicebus", "azure")
        self._message_class = self._common.ServiceBusMessage

    def _make_clients(self) -> tuple[Any, Any]:
        sb = self._sb
        if self._client_factory is not None:
            client = self._client_factory()
        elif self.connection_string is not None:
            client = sb.ServiceBusClient.from_connection_string(self.connection_string)
        else:
            client = sb.ServiceBusClient(self.fully_qualified_namespace, self.credential)
        admin = None
        if self.manage:
            if self._admin_factory is not None:
                admin = self._admin_factory()
            else:
                management = require("azure.servicebus.aio.management", "azure")
                admin_class = management.ServiceBusAdministrationClient
                admin = (admin_class.from_connection_string(self.connection_string)
                         if self.connection_string is not None
                         else admin_class(self.fully_qualified_namespace, self.credential))
        return client, admin

    def receiver(self, subscription: str, *, dead_letter: bool = False) -> Any:
        """A PEEK_LOCK receiver on ``subscription`` (not opened yet)."""
        client = self._client
        if client is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        options: dict[str, Any] = {}
        if dead_letter:
            options["sub_queue"] = self._common.ServiceBusSubQueue.DEAD_LETTER
        return client.get_subscription_receiver(
            topic_name=self.topic_name, subscription_name=subscription,
            receive_mode=self._common.ServiceBusReceiveMode.PEEK_LOCK, **options,
        )

    # --- connection --------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._sender is not None:
            return
        self._load()
        self._close_task = None
        client, admin = self._make_clients()
        try:
            with self.errors.mapped(f"connecting to {self._where}"):
                await asyncio.wait_for(self._open(client, admin), self.reconnect.connect_timeout)
        except asyncio.TimeoutError:
            await self._close_clients(client, admin, None)
            raise BrokerConnectionError(
                f"cannot connect to Azure Service Bus at {self._where}: no answer within "
                f"{self.reconnect.connect_timeout}s"
            ) from None
        except BaseException as exc:
            await self._close_clients(client, admin, None)
            if isinstance(exc, AmbError) and not isinstance(exc, BrokerConnectionError):
                raise BrokerConnectionError(
                    f"cannot connect to Azure Service Bus at {self._where}: {exc}") from exc
            raise

    async def _open(self, client: Any, admin: Any) -> None:
        self._client, self._admin = client, admin
        if admin is not None:
            await self._ensure_topic(admin)
        sender = client.get_topic_sender(topic_name=self.topic_name)
        await sender.__aenter__()
        self._sender = sender

    async def _ensure_topic(self, admin: Any) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        try:
            await admin.get_topic(self.topic_name)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                await admin.create_topic(self.topic_name)

    async def close(self) -> None:
        """Stop the subscriptions (abandoning what they hold), flush settlements, close the
        sender and the clients. Concurrent and repeated calls all wait for the one closing."""
        task = self._close_task
        if task is None:
            task = self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(task)

    async def _close(self) -> None:
        sender, self._sender = self._sender, None
        subscriptions = list(self._subscriptions)
        if subscriptions:
            await asyncio.gather(*(sub.close() for sub in subscriptions),
                                 return_exceptions=True)
        client, admin = self._client, self._admin
        self._client = self._admin = None
        await self._close_clients(client, admin, sender)

    async def _close_clients(self, client: Any, admin: Any, sender: Any) -> None:
        timeout = self.reconnect.connect_timeout
        for closeable in (sender, admin, client):
            if closeable is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closeable.close(), timeout)
        self._client = self._admin = None

    def forget(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    # --- publish -----------------------------------------------------------------------------

    def _message(self, topic: str, body: bytes, headers: dict[str, str]) -> Any:
        properties: dict[str, Any] = {}
        size = len(body) + len(topic) + 9
        content_type = None
        for key, value in headers.items():
            if key == CONTENT_TYPE:
                content_type = value
            else:
                properties[key] = value
            size += len(key) + len(value)
        properties[TOPIC_PROPERTY] = topic  # ours wins over a header of the same name
        if size > self.max_payload:
            raise ValueError(
                f"message of {size} bytes (body and properties) is over the Service Bus "
                f"message size limit of {self.max_payload} bytes (max_payload; Standard tier "
                "256 KB, Premium up to 100 MB)"
            )
        return self._message_class(
            body, application_properties=properties, content_type=content_type,
            message_id=headers.get(ID), session_id=headers.get(PARTITION_KEY),
        )

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        sender = self._sender
        if sender is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        message = self._message(topic, body, headers)
        try:
            await sender.send_messages(message)
        except Exception as exc:
            mapped = self.errors.translate(exc, f"publish to {topic!r}")
            if mapped is exc:
                raise
            raise mapped from exc

    # --- subscriptions and rules -------------------------------------------------------------

    def _admin_client(self) -> Any:
        if self._sender is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        if self._admin is None:
            raise AmbError("Azure Service Bus: manage=False, so subscriptions are not created "
                           "here; create them as docs/azure.md says")
        return self._admin

    def _rule_filter(self, pattern: str) -> Any:
        management = require("azure.servicebus.management", "azure")
        if is_wildcard(pattern):
            return management.SqlRuleFilter(sql_filter(pattern))
        return management.CorrelationRuleFilter(properties={TOPIC_PROPERTY: pattern})

    async def ensure_subscription(self, name: str, pattern: str, *, own: bool) -> None:
        """The subscription ``name`` with exactly the rule of ``pattern``, made if missing.
        Our rule goes in before the ``$Default`` (match-all) rule goes out, so no message of
        ``pattern`` published meanwhile is missed (what else slips in is dropped on receipt)."""
        from azure.core.exceptions import (
            HttpResponseError,
            ResourceExistsError,
            ResourceNotFoundError,
        )

        admin = self._admin_client()
        idle = self.plain_idle_delete if own else self.group_idle_delete
        options: dict[str, Any] = {
            "lock_duration": _seconds(self.lock_duration),
            "max_delivery_count": self.max_delivery_count,
        }
        if idle is not None:
            options["auto_delete_on_idle"] = _seconds(idle)
        try:
            with self.errors.mapped(f"creating subscription {name!r} for {pattern!r}"):
                with contextlib.suppress(ResourceExistsError):
                    await asyncio.wait_for(
                        admin.create_subscription(self.topic_name, name, **options),
                        self.reconnect.connect_timeout)
                with contextlib.suppress(ResourceExistsError):
                    await asyncio.wait_for(
                        admin.create_rule(self.topic_name, name, RULE_NAME,
                                          filter=self._rule_filter(pattern)),
                        self.reconnect.connect_timeout)
                with contextlib.suppress(ResourceNotFoundError):
                    await asyncio.wait_for(
                        admin.delete_rule(self.topic_name, name, DEFAULT_RULE),
                        self.reconnect.connect_timeout)
        except AmbError as exc:
            cause = exc.__cause__
            status = getattr(cause, "status_code", None)
            if isinstance(cause, HttpResponseError) and status in (401, 403):
                raise AmbError(
                    f"Azure Service Bus: creating subscription {name!r} was refused "
                    f"({status}): the credential needs Manage rights on {self._where}, or pass "
                    "manage=False and create the subscriptions yourself (docs/azure.md)"
                ) from cause
            raise
        except asyncio.TimeoutError:
            raise BrokerConnectionError(
                f"Azure Service Bus: creating subscription {name!r} took longer than "
                f"{self.reconnect.connect_timeout}s") from None

    async def _exists(self, name: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        if self._admin is None:
            return False
        with self.errors.mapped(f"looking up subscription {name!r}"):
            try:
                await self._admin.get_subscription(self.topic_name, name)
            except ResourceNotFoundError:
                return False
        return True

    async def delete_subscription_quietly(self, name: str) -> None:
        admin = self._admin
        if admin is None:
            return
        try:
            await asyncio.wait_for(admin.delete_subscription(self.topic_name, name),
                                   self.reconnect.connect_timeout)
        except Exception as exc:
            logger.debug("deleting subscription %r failed (the service deletes it once idle): "
                         "%r", name, exc)

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        validate_pattern(pattern)
        if self._sender is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        keeper = False
        own = group is None
        if group is None:
            name = plain_subscription_name()
            prefetch = max(prefetch, self.plain_prefetch)
        else:
            keeper_name = keeper_subscription_name(pattern)
            if not is_wildcard(pattern) and (pattern in self._kept
                                             or await self._exists(keeper_name)):
                name, keeper = keeper_name, True  # the letters wait there; groups share it
            else:
                name = group_subscription_name(group, pattern)
        if self.manage and not keeper:
            await self.ensure_subscription(name, pattern, own=own)
        sub = Subscription(self, pattern, handler, name, group=group, prefetch=prefetch,
                           own=own, counted=not keeper)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            await sub.close()
            raise
        return sub

    # --- dead letters and groups -------------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        """A durable keeper subscription for ``topic``: letters wait there from the first one,
        whether or not anyone subscribes (the bus's reply inboxes are never kept)."""
        if topic.startswith(INBOX_PREFIX) or topic in self._kept:
            return
        if not self.manage:
            return  # an operator's keeper (if any) is what dead_letters() reads
        await self.ensure_subscription(keeper_subscription_name(topic), topic, own=False)
        self._kept.add(topic)

    async def dead_letters(self, topic: str) -> AsyncIterator[Delivery]:
        """The letters in ``topic``'s keeper, oldest first, peeked (left in place, not
        locked); ``position`` is the letter's sequence number."""
        from azure.servicebus.exceptions import MessagingEntityNotFoundError

        if self._sender is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        letters: list[Delivery] = []
        receiver = self.receiver(keeper_subscription_name(topic))
        try:
            with self.errors.mapped(f"listing the dead letters of {topic!r}"):
                async with receiver:
                    sequence = 0
                    while True:
                        page = await receiver.peek_messages(max_message_count=_PEEK_PAGE,
                                                            sequence_number=sequence)
                        if not page:
                            break
                        for message in page:
                            letter_topic, headers = message_headers(message)
                            letters.append(Delivery(letter_topic or topic, message_body(message),
                                                    headers, position=message.sequence_number))
                        sequence = page[-1].sequence_number + 1
        except MessagingEntityNotFoundError:
            return  # nothing was ever kept there
        except AmbError as exc:
            if isinstance(exc.__cause__, MessagingEntityNotFoundError):
                return
            raise
        for letter in letters:
            yield letter

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        """Receive the keeper's letters and complete exactly those at ``positions`` (sequence
        numbers); the others are abandoned, back in their place."""
        from azure.servicebus.exceptions import MessagingEntityNotFoundError

        wanted = {int(position) for position in positions}
        if not wanted:
            return 0
        if self._sender is None:
            raise NotConnected("AzureServiceBusBroker is not connected")
        removed = 0
        others: list[Any] = []
        receiver = self.receiver(keeper_subscription_name(topic))
        try:
            with self.errors.mapped(f"removing dead letters of {topic!r}"):
                async with receiver:
                    try:
                        while wanted:
                            batch = await receiver.receive_messages(
                                max_message_count=_PEEK_PAGE, max_wait_time=1.0)
                            if not batch:
                                break
                            mine = [m for m in batch if m.sequence_number in wanted]
                            others.extend(m for m in batch if m.sequence_number not in wanted)
                            await asyncio.gather(*(receiver.complete_message(m) for m in mine))
                            removed += len(mine)
                            wanted.difference_update(m.sequence_number for m in mine)
                    finally:
                        await asyncio.gather(*(receiver.abandon_message(m) for m in others),
                                             return_exceptions=True)
        except MessagingEntityNotFoundError:
            return 0
        except AmbError as exc:
            if isinstance(exc.__cause__, MessagingEntityNotFoundError):
                return 0
            raise
        return removed

    async def delete_group(self, pattern: str, group: str) -> None:
        """Delete the group's subscription with the messages waiting in it. A group on a kept
        dead-letter topic reads the keeper, which stays (the letters are not the group's)."""
        from azure.core.exceptions import ResourceNotFoundError

        validate_pattern(pattern)
        admin = self._admin_client()
        name = group_subscription_name(group, pattern)
        with self.errors.mapped(f"deleting group {group!r} on {pattern!r}"), \
                contextlib.suppress(ResourceNotFoundError):
            await asyncio.wait_for(admin.delete_subscription(self.topic_name, name),
                                   self.reconnect.connect_timeout)


def _entity_path(connection_string: str) -> str | None:
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "entitypath" and value:
            return value
    return None


__all__ = ["AzureServiceBusBroker", "mask_connection_string"]
