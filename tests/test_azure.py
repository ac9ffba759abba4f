"""The Azure Service Bus adapter's own cases, over the fake namespace of ``tests/azure_fake.py``:
rules (segment-exact SQL filters, checked against amb's own matcher), the fake's strictness, the
key kept out of reprs and logs, sign-in options, the size limit, lock renewal, concurrent
settlements, a receiver that loses its connection, what the adapter creates and deletes."""

from __future__ import annotations

import asyncio
import datetime
import logging
import pathlib
import time

import pytest

pytest.importorskip("azure.servicebus", reason="azure-servicebus is not installed "
                    "(pip install 'amb-core[azure]')")

from azure.core.exceptions import HttpResponseError
from azure.servicebus import ServiceBusMessage
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessagingEntityNotFoundError,
)
from azure.servicebus.management import SqlRuleFilter
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.azure_fake import FakeNamespace, compile_filter, connection_lost
from tests.test_contract_azure import FAKE_CONNECTION, fake_broker

from amb_core import AgentMessageBus, Message
from amb_core.adapters import AzureServiceBusBroker, broker_from_url
from amb_core.adapters.azure import group_subscription_name, keeper_subscription_name, sql_filter
from amb_core.adapters.azure.rules import exact_by_rule, like_pattern, valid_name
from amb_core.broker import Delivery
from amb_core.errors import AmbError, BrokerConnectionError, MissingDependency, NotConnected
from amb_core.topics import matches

SECRET = "not-a-real-key="

# --- rules -----------------------------------------------------------------------------------

_SEGMENT = st.text(alphabet="ab%_!'[x", min_size=1, max_size=3)
_TOPICS = st.lists(_SEGMENT, min_size=1, max_size=5).map(".".join)


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.one_of(_SEGMENT, st.just("*")), min_size=1, max_size=4))
    if draw(st.booleans()):
        segments.append(">")
    return ".".join(segments)


@settings(max_examples=400, deadline=None)
@given(_patterns(), _TOPICS, st.data())
def test_sql_rule_matches_what_amb_matches(pattern: str, topic: str, data: st.DataObject) -> None:
    """The rule the adapter writes, evaluated by the fake's SQL engine, against amb's matcher:
    exact where :func:`exact_by_rule` says so, never narrower."""
    if data.draw(st.booleans()):  # also topics built from the pattern, so matches are common
        topic = ".".join(
            data.draw(_SEGMENT) if s == "*" else ".".join(data.draw(st.lists(_SEGMENT,
                                                                             min_size=1,
                                                                             max_size=3)))
            if s == ">" else s
            for s in pattern.split(".")
        )
    rule = compile_filter(SqlRuleFilter(sql_filter(pattern)))
    expected = matches(pattern, topic)
    got = rule({"amb_topic": topic})
    if exact_by_rule(pattern):
        assert got == expected, (pattern, topic, sql_filter(pattern))
    else:
        assert got or not expected, (pattern, topic, sql_filter(pattern))


def test_sql_rule_text() -> None:
    assert sql_filter("events.user.*") == (
        "amb_topic LIKE 'events.user.%' ESCAPE '!' AND amb_topic NOT LIKE '%.%.%.%'")
    assert sql_filter("a_b.>") == "amb_topic LIKE 'a!_b.%' ESCAPE '!'"
    assert like_pattern("it's.100%.!") == "it's.100!%.!!"
    assert "'it''s.%'" in sql_filter("it's.*")
    rule = compile_filter(SqlRuleFilter(sql_filter("events.user.*")))
    assert rule({"amb_topic": "events.user.a"})
    assert not rule({"amb_topic": "events.user.a.b"})
    assert not rule({"amb_topic": "events.userXa"})
    assert not rule({})


def test_subscription_names_are_valid_and_distinct() -> None:
    names = {group_subscription_name(g, p) for g in ("workers", "w" * 80, "ünï")
             for p in ("a.*", "a._star_", "a.>", "x" * 255, "événements.用户")}
    names |= {keeper_subscription_name(t) for t in ("amb.dead-letter", "a.dlq", "b.dlq")}
    assert len(names) == 18
    assert all(valid_name(n) and len(n) <= 50 for n in names), names


# --- the fake is strict where the service is ----------------------------------------------------


async def _fake_with_subscription() -> tuple[FakeNamespace, object]:
    ns = FakeNamespace()
    admin = ns.admin()
    await admin.create_topic("t")
    await admin.create_subscription("t", "s", lock_duration=datetime.timedelta(seconds=0.2))
    sender = ns.client().get_topic_sender(topic_name="t")
    await sender.send_messages(ServiceBusMessage(b"x", application_properties={"k": "v"}))
    return ns, admin


async def test_fake_refuses_what_the_service_refuses() -> None:
    ns, admin = await _fake_with_subscription()
    receiver = ns.client().get_subscription_receiver(topic_name="t", subscription_name="s")
    [message] = await receiver.receive_messages(max_message_count=5, max_wait_time=1)
    assert message.application_properties == {b"k": b"v"}  # bytes, like 7.15
    assert message.delivery_count == 0
    await receiver.complete_message(message)
    with pytest.raises(MessageAlreadySettled):
        await receiver.complete_message(message)

    await ns.client().get_topic_sender(topic_name="t").send_messages(ServiceBusMessage(b"y"))
    [late] = await receiver.receive_messages(max_message_count=5, max_wait_time=1)
    await asyncio.sleep(0.3)  # the lock expires
    with pytest.raises(MessageLockLostError):
        await receiver.complete_message(late)
    [again] = await receiver.receive_messages(max_message_count=5, max_wait_time=1)
    assert again.delivery_count == 1

    missing = ns.client().get_subscription_receiver(topic_name="t", subscription_name="nope")
    with pytest.raises(MessagingEntityNotFoundError):
        await missing.receive_messages(max_wait_time=0.1)
    for bad in ("amb_topic LIKE 'a!b' ESCAPE '!'", "amb_topic LIKE 'a", "amb_topic LIKE 'a' "
                "ESCAPE '!!'", "amb_topic ~ 'a'", "amb_topic LIKE 'a' AND"):
        with pytest.raises(HttpResponseError):
            await admin.create_rule("t", "s", "r", filter=SqlRuleFilter(bad))  # type: ignore[attr-defined]
    with pytest.raises(HttpResponseError):
        await admin.create_subscription("t", "x" * 51)  # type: ignore[attr-defined]


# --- sign-in, repr, logs, URLs ------------------------------------------------------------------


async def test_the_key_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns)
    assert SECRET not in repr(broker) and "SharedAccessKey=***" in repr(broker)
    caplog.set_level(logging.DEBUG)
    bus = AgentMessageBus(broker=broker)
    await bus.connect()
    got: list[Message] = []
    await bus.subscribe("k.t", got.append)
    await bus.publish(Message(topic="k.t", payload=1))
    await bus.close()
    assert SECRET not in caplog.text and SECRET not in repr(bus)


def test_sign_in_options_and_urls() -> None:
    by_url = broker_from_url("azuresb://RootManageSharedAccessKey:a%2Bb%3D@ns.servicebus.windows"
                             ".net/agent-messages?manage=0&max_payload=1048576")
    assert isinstance(by_url, AzureServiceBusBroker)
    assert by_url.topic_name == "agent-messages" and by_url.manage is False
    assert by_url.capabilities.max_payload == 1048576
    assert by_url.connection_string == ("Endpoint=sb://ns.servicebus.windows.net/;"
                                        "SharedAccessKeyName=RootManageSharedAccessKey;"
                                        "SharedAccessKey=a+b=")
    assert "a+b=" not in repr(by_url)
    raw = broker_from_url(f"azuresb://{FAKE_CONNECTION};EntityPath=agents")
    assert isinstance(raw, AzureServiceBusBroker) and raw.topic_name == "agents"
    emulator = broker_from_url("azuresb://k:v@localhost/t?emulator=1")
    assert isinstance(emulator, AzureServiceBusBroker)
    assert emulator.connection_string is not None
    assert emulator.connection_string.endswith(";UseDevelopmentEmulator=true")
    with pytest.raises(ValueError):
        broker_from_url("azuresb://k:v@ns/t?colour=blue")
    with pytest.raises(ValueError):
        AzureServiceBusBroker(fully_qualified_namespace="ns.servicebus.windows.net")
    with pytest.raises(ValueError):
        AzureServiceBusBroker()
    try:
        import azure.identity  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="pip install azure-identity"):
            broker_from_url("azuresb://ns.servicebus.windows.net/agents")
    credential = object()
    by_identity = AzureServiceBusBroker(fully_qualified_namespace="ns.servicebus.windows.net",
                                        credential=credential, topic_name="agents")
    assert "ns.servicebus.windows.net" in repr(by_identity)


async def test_publish_before_connect_and_after_close() -> None:
    broker = fake_broker(FakeNamespace())
    with pytest.raises(NotConnected):
        await broker.publish("a", b"", {})
    await broker.connect()
    await broker.close()
    with pytest.raises(NotConnected):
        await broker.publish("a", b"", {})
    await broker.connect()  # a closed broker connects again
    await broker.publish("a", b"", {})
    await broker.close()


async def test_a_connect_that_fails_is_a_broker_connection_error() -> None:
    ns = FakeNamespace()

    class Refusing:
        def __init__(self) -> None:
            self.inner = ns.admin()

        async def get_topic(self, name: str) -> None:
            from azure.core.exceptions import ClientAuthenticationError
            raise ClientAuthenticationError(message="401 unauthorized")

        async def close(self) -> None:
            return None

    broker = AzureServiceBusBroker(connection_string=FAKE_CONNECTION, client_factory=ns.client,
                                   admin_factory=Refusing)
    with pytest.raises(BrokerConnectionError) as info:
        await broker.connect()
    assert SECRET not in str(info.value)


# --- size ------------------------------------------------------------------------------------


async def test_a_message_over_the_limit_is_refused_before_it_is_sent() -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns)
    await broker.connect()
    try:
        sent = ns.sent
        body = b"x" * (256 * 1024 - 2000)  # under the body limit the bus checks ...
        headers = {"x-big": "y" * 4000}      # ... but not with its properties
        with pytest.raises(ValueError, match="limit"):
            await broker.publish("big", body, headers)
        assert ns.sent == sent
        await broker.publish("big", body, {"x-small": "y"})
        assert ns.sent == sent + 1
    finally:
        await broker.close()
    premium = fake_broker(FakeNamespace(max_message_size=100 * 1024 * 1024),
                          max_payload=100 * 1024 * 1024)
    assert premium.capabilities.max_payload == 100 * 1024 * 1024


# --- receiving, settling, renewing ----------------------------------------------------------


async def _collect(broker: AzureServiceBusBroker, pattern: str, *, group: str | None = None,
                   prefetch: int = 1) -> tuple[list[Delivery], asyncio.Event]:
    got: list[Delivery] = []
    changed = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        got.append(delivery)
        await delivery.ack()
        changed.set()

    await broker.subscribe(pattern, handle, group=group, prefetch=prefetch)
    return got, changed


async def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_locks_are_renewed_while_a_long_handler_runs() -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns, lock_duration=0.3)
    await broker.connect()
    try:
        seen: list[int | None] = []
        done = asyncio.Event()

        async def slow(delivery: Delivery) -> None:
            seen.append(delivery.delivery_count)
            await asyncio.sleep(1.0)  # more than three lock durations
            await delivery.ack()
            done.set()

        await broker.subscribe("slow", slow, group="g")
        await broker.publish("slow", b"1", {})
        await asyncio.wait_for(done.wait(), 5)
        await _until(lambda: ns.settled == 1)
        await asyncio.sleep(0.5)  # a window for a redelivery, if the lock was lost
        assert seen == [1], "the message came back: its lock was not renewed"
        assert ns.renewed >= 2
    finally:
        await broker.close()


async def test_settlements_run_concurrently() -> None:
    ns = FakeNamespace()
    ns.settle_delay = 0.05
    broker = fake_broker(ns)
    await broker.connect()
    try:
        got, _ = await _collect(broker, "many", prefetch=64)
        for i in range(64):
            await broker.publish("many", str(i).encode(), {})
        await _until(lambda: ns.settled == 64)
        assert ns.settling_peak > 8, ns.settling_peak
        assert sorted(int(d.body) for d in got) == list(range(64))
    finally:
        await broker.close()


async def test_a_receiver_that_loses_its_connection_is_reopened() -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns, receive_wait=0.2)
    await broker.connect()
    try:
        got, _ = await _collect(broker, "lossy", group="g")
        await broker.publish("lossy", b"before", {})
        await _until(lambda: len(got) == 1)
        ns.receive_failures.extend([connection_lost(), connection_lost()])
        await _until(lambda: not ns.receive_failures)
        await broker.publish("lossy", b"after", {})
        await _until(lambda: [d.body for d in got] == [b"before", b"after"])
    finally:
        await broker.close()


async def test_wide_rules_are_narrowed_on_receipt() -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns)
    await broker.connect()
    try:
        got, _ = await _collect(broker, "t.*.x.>")
        await broker.publish("t.a.b.x.c", b"stray", {})  # the rule lets it through
        await broker.publish("t.a.x.b.c", b"ours", {})
        await _until(lambda: ns.settled == 2)
        assert [d.body for d in got] == [b"ours"]
        assert got[0].topic == "t.a.x.b.c"
    finally:
        await broker.close()


async def test_key_travels_as_the_session_id() -> None:
    ns = FakeNamespace()
    bus = AgentMessageBus(broker=fake_broker(ns))
    await bus.connect()
    try:
        await bus.publish(Message(topic="orders", payload=1, key="customer-7"))
        assert ns.last_sent is not None and ns.last_sent.session_id == "customer-7"
        assert ns.last_sent.message_id is not None
    finally:
        await bus.close()


# --- what the adapter creates and deletes ----------------------------------------------------


async def test_subscriptions_made_kept_and_deleted() -> None:
    ns = FakeNamespace()
    broker = fake_broker(ns, group_idle_delete=3600.0)
    await broker.connect()
    try:
        topic = ns.topics["amb-test"]

        async def nothing(delivery: Delivery) -> None:
            await delivery.ack()

        plain = await broker.subscribe("a.b", nothing)
        grouped = await broker.subscribe("a.*", nothing, group="workers")
        await broker.keep_dead_letters("a.dlq")
        names = set(topic.subscriptions)
        group_name = group_subscription_name("workers", "a.*")
        keeper = keeper_subscription_name("a.dlq")
        assert {group_name, keeper} < names and len(names) == 3
        plain_name = (names - {group_name, keeper}).pop()
        assert topic.subscriptions[plain_name].auto_delete_on_idle == datetime.timedelta(
            seconds=300)
        assert topic.subscriptions[group_name].auto_delete_on_idle == datetime.timedelta(
            seconds=3600)
        assert all(set(s.rules) == {"amb"} for s in topic.subscriptions.values())
        await plain.close()
        await grouped.close()
        assert set(topic.subscriptions) == {group_name, keeper}  # the plain one is gone
        await broker.delete_group("a.*", "workers")
        assert set(topic.subscriptions) == {keeper}
        await broker.delete_group("a.*", "workers")  # again: nothing to delete, no error
    finally:
        await broker.close()


async def test_without_manage_rights_existing_subscriptions_are_used() -> None:
    ns = FakeNamespace()
    owner = fake_broker(ns)
    await owner.connect()
    await owner.ensure_subscription(group_subscription_name("workers", "jobs"), "jobs",
                                    own=False)
    await owner.close()
    broker = fake_broker(ns, manage=False)
    await broker.connect()
    try:
        before = set(ns.topics["amb-test"].subscriptions)
        await broker.keep_dead_letters("jobs.dlq")  # nothing made, nothing assumed
        got, _ = await _collect(broker, "jobs", group="workers")
        await broker.publish("jobs", b"1", {})
        await _until(lambda: len(got) == 1)
        assert set(ns.topics["amb-test"].subscriptions) == before
        assert [d async for d in broker.dead_letters("jobs.dlq")] == []
        with pytest.raises(AmbError, match="does not exist; with manage=False create it"):
            await broker.subscribe("other", lambda d: asyncio.sleep(0), group="workers")
        with pytest.raises(AmbError, match="manage=False"):
            await broker.delete_group("jobs", "workers")
    finally:
        await broker.close()


def test_the_production_code_cannot_reach_the_fake() -> None:
    root = pathlib.Path(__file__).resolve().parents[1] / "src" / "amb_core"
    for path in root.rglob("*.py"):
        assert "azure_fake" not in path.read_text(), path


def test_the_fake_stands_where_the_sdk_stands() -> None:
    """Every method the fake implements exists on the SDK's class, coroutine for coroutine,
    and takes no parameter the SDK's does not (the adapter calls what both have)."""
    import inspect

    from azure.servicebus import ServiceBusReceivedMessage
    from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
    from azure.servicebus.aio.management import ServiceBusAdministrationClient
    from tests import azure_fake

    pairs = [(azure_fake.FakeClient, ServiceBusClient), (azure_fake.FakeSender, ServiceBusSender),
             (azure_fake.FakeReceiver, ServiceBusReceiver),
             (azure_fake.FakeAdministrationClient, ServiceBusAdministrationClient)]
    for fake, real in pairs:
        for name, method in vars(fake).items():
            if name.startswith("_") and name not in ("__aenter__", "__aexit__"):
                continue
            if not callable(method):
                continue
            real_method = getattr(real, name, None)
            assert real_method is not None, f"{real.__name__} has no {name}"
            assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(
                real_method), f"{fake.__name__}.{name}: async on one side only"
            real_parameters = inspect.signature(real_method).parameters
            open_ended = any(p.kind is p.VAR_KEYWORD for p in real_parameters.values())
            for parameter in inspect.signature(method).parameters.values():
                if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                    continue
                assert parameter.name in real_parameters or open_ended, (
                    f"{fake.__name__}.{name}({parameter.name}=...) is not the SDK's")
    received = {name for name in dir(ServiceBusReceivedMessage) if not name.startswith("_")}
    fake_message = {"application_properties", "body", "content_type", "delivery_count",
                    "message_id", "session_id", "sequence_number", "lock_token",
                    "locked_until_utc", "enqueued_time_utc", "dead_letter_reason"}
    assert fake_message <= received, fake_message - received


async def test_the_default_path_builds_the_sdks_own_objects() -> None:
    """Without factories the adapter makes the SDK's own client, admin client, receivers and
    messages, with the keyword arguments it uses on the fake (no I/O happens here)."""
    from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
    from azure.servicebus.aio.management import ServiceBusAdministrationClient
    from azure.servicebus.management import CorrelationRuleFilter

    broker = AzureServiceBusBroker(connection_string=FAKE_CONNECTION, topic_name="t")
    broker._load()
    client, admin = broker._make_clients()
    try:
        assert isinstance(client, ServiceBusClient)
        assert isinstance(admin, ServiceBusAdministrationClient)
        broker._client = client
        assert isinstance(broker.receiver("s"), ServiceBusReceiver)
        assert isinstance(broker.receiver("s", dead_letter=True), ServiceBusReceiver)
        assert isinstance(client.get_topic_sender(topic_name="t"), ServiceBusSender)
        message = broker._message("a.b", b"{}", {"cloudEvents_id": "id-1",
                                                 "cloudEvents_partitionkey": "k",
                                                 "content-type": "application/json",
                                                 "x-app": "y"})
        assert isinstance(message, ServiceBusMessage)
        assert (message.message_id, message.session_id, message.content_type) == (
            "id-1", "k", "application/json")
        assert message.application_properties == {"cloudEvents_id": "id-1",
                                                  "cloudEvents_partitionkey": "k",
                                                  "x-app": "y", "amb_topic": "a.b"}
        assert isinstance(broker._rule_filter("a.*"), SqlRuleFilter)
        assert isinstance(broker._rule_filter("a.b"), CorrelationRuleFilter)
    finally:
        broker._client = None
        await client.close()
        await admin.close()


async def test_retries_keep_their_order_whatever_the_jitter() -> None:
    """A later message's retry with a shorter delay does not overtake an earlier one's."""
    ns = FakeNamespace()
    broker = fake_broker(ns)
    await broker.connect()
    try:
        order: list[tuple[bytes, int | None]] = []
        done = asyncio.Event()

        async def handle(delivery: Delivery) -> None:
            order.append((delivery.body, delivery.delivery_count))
            if delivery.delivery_count == 1:
                took = await delivery.retry_later(0.2 if delivery.body == b"a" else 0.0)
                assert took
                return
            await delivery.ack()
            if len(order) == 4:
                done.set()

        await broker.subscribe("ordered", handle, group="g")
        await broker.publish("ordered", b"a", {})
        await broker.publish("ordered", b"b", {})
        await asyncio.wait_for(done.wait(), 5)
        assert order == [(b"a", 1), (b"b", 1), (b"a", 2), (b"b", 2)]
    finally:
        await broker.close()
