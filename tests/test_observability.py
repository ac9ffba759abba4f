"""Observability: user metrics, built-in bus metrics (scraped over HTTP), tracing, logging."""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import require_server

from amb_core import AgentMessageBus, Message, RetryPolicy
from amb_core.adapters import MemoryBroker
from amb_core.observability import (
    JsonFormatter,
    Metrics,
    TraceContextFilter,
    default_topic_label,
    instrument,
    serve_metrics,
)
from amb_core.observability._bus import BusMetricsStore, BusObserver
from amb_core.observability._config import Settings

SRC = Path(__file__).resolve().parent.parent / "src" / "amb_core"
WAIT = 10.0


def unique(prefix: str = "obs") -> str:
    return f"{prefix}.t{uuid.uuid4().hex[:10]}"


async def wait_for(event: asyncio.Event, timeout: float = WAIT) -> None:
    await asyncio.wait_for(event.wait(), timeout)


# --- metrics for user code -------------------------------------------------------------------


def test_guide_example_works_as_written() -> None:
    # The user guide's example, verbatim apart from the `process` it calls.
    processed: list[Any] = []

    async def process(msg: Message) -> None:
        processed.append(msg.payload)

    from amb_core.observability import metrics

    @metrics.track("message_processing")          # counts calls, errors, and a latency histogram
    async def handle_message(msg: Message):
        metrics.gauge("message_lag_seconds", time.time() - msg.timestamp)
        await process(msg)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    calls = sample("message_processing_calls_total")
    observed = sample("message_processing_duration_seconds_count")

    async def main() -> None:
        async with AgentMessageBus() as bus:
            done = asyncio.Event()

            async def handler(msg: Message) -> None:
                await handle_message(msg)
                if len(processed) == 5:
                    done.set()

            topic = unique()
            await bus.subscribe(topic, handler)
            for i in range(5):
                await bus.publish(Message(topic=topic, payload=i))
            await wait_for(done)

    asyncio.run(main())
    assert processed == [0, 1, 2, 3, 4]
    assert sample("message_processing_calls_total") == calls + 5
    assert sample("message_processing_duration_seconds_count") == observed + 5
    lag = REGISTRY.get_sample_value("message_lag_seconds")
    assert lag is not None and 0.0 <= lag < WAIT
    assert inspect.iscoroutinefunction(handle_message)
    assert handle_message.__name__ == "handle_message"


def test_track_counts_calls_errors_and_durations_of_sync_and_async_functions() -> None:
    registry = CollectorRegistry()
    m = Metrics(Settings(registry=registry))

    @m.track("work")
    def work(a: int, b: int = 2, *, scale: float = 1.0) -> float:
        """Multiply."""
        if a < 0:
            raise ValueError("negative")
        return a * b * scale

    @m.track("async_work", labels={"kind": "test"})
    async def async_work(x: str) -> str:
        """Echo."""
        await asyncio.sleep(0)
        if x == "boom":
            raise RuntimeError(x)
        return x

    assert work(3) == 6
    assert work(1, 5, scale=2.0) == 10
    with pytest.raises(ValueError):
        work(-1)
    assert asyncio.run(async_work("hi")) == "hi"
    with pytest.raises(RuntimeError):
        asyncio.run(async_work("boom"))

    # name, docstring and signature survive; an async function stays a coroutine function
    assert work.__name__ == "work" and work.__doc__ == "Multiply."
    assert str(inspect.signature(work)) == (
        "(a: 'int', b: 'int' = 2, *, scale: 'float' = 1.0) -> 'float'"
    )
    assert async_work.__name__ == "async_work" and async_work.__doc__ == "Echo."
    assert str(inspect.signature(async_work)) == "(x: 'str') -> 'str'"
    assert inspect.iscoroutinefunction(async_work)
    assert not inspect.iscoroutinefunction(work)

    value = registry.get_sample_value
    assert value("work_calls_total") == 3
    assert value("work_errors_total") == 1
    assert value("work_duration_seconds_count") == 3
    assert value("async_work_calls_total", {"kind": "test"}) == 2
    assert value("async_work_errors_total", {"kind": "test"}) == 1
    assert value("async_work_duration_seconds_count", {"kind": "test"}) == 2


def test_counter_gauge_histogram_and_label_rules() -> None:
    registry = CollectorRegistry()
    m = Metrics(Settings(registry=registry))
    m.counter("orders_received", labels={"region": "eu"})
    m.counter("orders_received", 2, labels={"region": "eu"})
    m.gauge("queue.depth", 17)  # dots are not Prometheus: becomes queue_depth
    m.gauge("queue.depth", 4)
    m.histogram("payload_bytes", 100, buckets=(10, 1000))
    m.histogram("payload_bytes", 5)
    assert registry.get_sample_value("orders_received_total", {"region": "eu"}) == 3
    assert registry.get_sample_value("queue_depth") == 4
    assert registry.get_sample_value("payload_bytes_bucket", {"le": "10.0"}) == 1
    assert registry.get_sample_value("payload_bytes_count") == 2
    with pytest.raises(ValueError, match="label"):
        m.counter("orders_received", labels={"country": "fr"})
    assert m.enabled


def test_user_metrics_also_go_to_opentelemetry_when_a_meter_provider_is_set() -> None:
    reader = InMemoryMetricReader()
    m = Metrics(Settings(registry=CollectorRegistry(), meter_provider=MeterProvider([reader])))

    @m.track("otel_work")
    def work() -> None:
        m.gauge("otel_depth", 3)

    work()
    work()
    points = _otel_points(reader)
    assert points["otel_work_calls"] == [({}, 2)]
    assert points["otel_depth"] == [({}, 3)]
    assert points["otel_work_duration_seconds"][0][1] == 2  # a histogram's count


def test_without_the_extra_everything_imports_and_is_a_no_op(tmp_path: Path) -> None:
    # A child interpreter where prometheus_client and opentelemetry cannot be imported.
    code = textwrap.dedent(
        """
        import asyncio, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
                    raise ModuleNotFoundError(name)
                return None
        sys.meta_path.insert(0, Block())

        from amb_core import AgentMessageBus, Message
        from amb_core.errors import MissingDependency
        from amb_core.observability import metrics, serve_metrics, get_registry

        @metrics.track("t")
        async def handler(msg):
            metrics.gauge("g", 1.0)
            metrics.counter("c")
            metrics.histogram("h", 2.0)
            return msg.payload

        async def main():
            async with AgentMessageBus() as bus:
                assert bus._observer is None, bus._observer
                await bus.subscribe("x.y", handler)
                reply = await bus.request(Message(topic="x.y", payload=41), timeout=5)
                assert reply.payload == 41
        asyncio.run(main())
        assert not metrics.enabled
        for call in (serve_metrics, get_registry):
            try:
                call()
            except MissingDependency as exc:
                assert "amb-core[observability]" in str(exc)
            else:
                raise AssertionError(f"{call.__name__} did not raise")
        assert "prometheus_client" not in sys.modules and "opentelemetry" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- built-in bus metrics ----------------------------------------------------------------------


def test_default_topic_label_is_bounded() -> None:
    assert default_topic_label("orders") == "orders"
    assert default_topic_label("orders.created") == "orders.created"
    assert default_topic_label("orders.created.eu.42") == "orders.created.>"
    assert default_topic_label("_amb.inbox.0123abcd") == "_amb.inbox.*"
    assert default_topic_label("_INBOX.xyz.1") == "_INBOX.*"
    assert default_topic_label("a.b.c", segments=1) == "a.>"


def test_observer_is_on_by_default_and_off_at_no_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AgentMessageBus()._observer is not None  # the extra is installed here
    assert AgentMessageBus(observer=False)._observer is None
    monkeypatch.setenv("AMB_OBSERVABILITY", "0")
    assert AgentMessageBus()._observer is None
    assert AgentMessageBus(observer=True)._observer is not None


async def test_instrument_covers_a_bus_made_without_metrics() -> None:
    async with AgentMessageBus(observer=False) as bus:
        got = asyncio.Event()
        topic = unique()
        sub = await bus.subscribe(topic, lambda msg: got.set())
        assert sub._probe is None
        observer = instrument(bus)
        assert bus._observer is observer and sub._probe is not None
        await bus.publish(Message(topic=topic, payload=1))
        await wait_for(got)
    stats = observer.store.subscription("memory", topic)
    assert stats.delivered == 1


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_prometheus_scrape_shows_the_built_in_metrics_of_a_running_bus() -> None:
    base = unique()
    orders, rpc, dead = f"{base}.orders", f"{base}.rpc", f"{base}.dead"
    broker = MemoryBroker()
    server = serve_metrics(0, "127.0.0.1")
    try:
        async with AgentMessageBus(broker) as bus, AgentMessageBus(broker) as client:
            finished = asyncio.Event()
            dead_letters = asyncio.Event()
            release = asyncio.Event()
            handled: list[int] = []

            async def handle(msg: Message) -> None:
                if msg.payload == "block":
                    await release.wait()
                    return
                if msg.payload < 0:
                    raise ValueError("negative order")
                handled.append(msg.payload)
                if len(handled) == 10:
                    finished.set()

            dead_seen: list[Message] = []

            async def on_dead(msg: Message) -> None:
                dead_seen.append(msg)
                if len(dead_seen) == 3:
                    dead_letters.set()

            await bus.subscribe(
                orders, handle, max_concurrency=4,
                retry=RetryPolicy(max_attempts=2, initial_delay=0.0, jitter=0.0),
                dead_letter_topic=dead,
            )
            await bus.subscribe(dead, on_dead)
            await bus.subscribe(rpc, lambda msg: {"echo": msg.payload})

            for i in range(10):
                await bus.publish(Message(topic=orders, payload=i))
            for i in range(1, 4):
                await bus.publish(Message(topic=orders, payload=-i))
            await wait_for(finished)
            await wait_for(dead_letters)
            reply = await client.request(Message(topic=rpc, payload=7), timeout=WAIT)
            assert reply.payload == {"echo": 7}
            stale = {"amb-timeout": "1.000", "amb-expires": f"{time.time() - 60:.3f}"}
            await bus.publish(Message(topic=orders, payload="stale", headers=stale))
            await bus.publish(Message(topic=orders, payload="block"))

            # A handler is blocked now: in flight shows it.
            url = server.url
            label = default_topic_label(orders)
            sub_labels = frozenset({("broker", "memory"), ("pattern", orders)})

            def value(name: str, labels: frozenset[tuple[str, str]]) -> float:
                return scraped.get((name, labels), -1.0)

            for _ in range(200):  # bounded: the blocked handler starts within a few loop turns
                scraped = await asyncio.to_thread(_scrape, url)
                if value("amb_handlers_in_flight", sub_labels) == 1:
                    break
                await asyncio.sleep(0.01)
            assert value("amb_handlers_in_flight", sub_labels) == 1
            release.set()

        scraped = await asyncio.to_thread(_scrape, url)
    finally:
        server.close()

    topic_labels = frozenset({("broker", "memory"), ("topic", label)})
    dead_labels = frozenset({("broker", "memory"), ("pattern", dead)})
    assert label == f"{base}.>"
    # published: 15 orders (one stale) + 3 dead letters + 1 request, under the bounded label
    assert value("amb_messages_published_total", topic_labels) == 19
    assert value("amb_messages_expired_total", sub_labels) == 1
    assert value("amb_messages_delivered_total", sub_labels) == 14
    assert value("amb_handler_succeeded_total", sub_labels) == 11  # 10 orders + the blocked one
    assert value("amb_handler_failed_total", sub_labels) == 6  # 3 poison x 2 attempts
    assert value("amb_messages_retried_total", sub_labels) == 3
    assert value("amb_messages_dead_lettered_total", sub_labels) == 3
    assert value("amb_messages_delivered_total", dead_labels) == 3
    assert value("amb_handlers_in_flight", sub_labels) == 0
    assert value("amb_handler_duration_seconds_count", sub_labels) == 17
    assert value("amb_delivery_lag_seconds_count", sub_labels) == 14
    inf = frozenset({*sub_labels, ("le", "+Inf")})
    assert value("amb_handler_duration_seconds_bucket", inf) == 17
    assert 0 <= value("amb_delivery_lag_seconds_sum", sub_labels) < 14 * WAIT
    assert value("amb_request_duration_seconds_count", topic_labels) == 1
    timeouts = frozenset({*topic_labels, ("reason", "timeout")})
    assert value("amb_request_failures_total", timeouts) == 0
    reply_labels = frozenset({("broker", "memory"), ("topic", "_reply")})
    assert value("amb_messages_published_total", reply_labels) >= 1
    # raw topics never become labels
    assert not any(
        dict(labels).get("topic", "").startswith(orders) for _, labels in scraped
    )


async def test_request_timeouts_and_sync_handlers_are_counted() -> None:
    store = BusMetricsStore()
    config = Settings(registry=CollectorRegistry())
    base = unique()
    async with AgentMessageBus(observer=False) as bus:
        bus._observer = BusObserver(bus, config=config, store=store)
        done = asyncio.Event()
        seen: list[int] = []

        def sync_handler(msg: Message) -> None:  # runs in a worker thread
            seen.append(msg.payload)
            if len(seen) == 3:
                bus_loop.call_soon_threadsafe(done.set)

        bus_loop = asyncio.get_running_loop()
        await bus.subscribe(f"{base}.sync", sync_handler)
        for i in range(3):
            await bus.publish(Message(topic=f"{base}.sync", payload=i))
        await wait_for(done)
        with pytest.raises(TimeoutError):
            await bus.request(Message(topic=f"{base}.nobody", payload=1), timeout=0.05)
    stats = store.subscription("memory", f"{base}.sync")
    assert (stats.delivered, stats.succeeded, stats.failed) == (3, 3, 0)
    topic = store.topic("memory", f"{base}.>")
    assert (topic.timeouts, topic.errors, topic.request.count) == (1, 0, 0)
    assert topic.published == 4


async def test_publish_labels_are_capped() -> None:
    store = BusMetricsStore()
    config = Settings(registry=CollectorRegistry(), max_topic_labels=3, topic_label=lambda t: t)
    async with AgentMessageBus(observer=False) as bus:
        bus._observer = BusObserver(bus, config=config, store=store)
        for i in range(10):
            await bus.publish(Message(topic=f"ids.{i}", payload=i))
    labels = {t.labels[1]: t.published for t in store.topics.values()}
    assert labels == {"_reply": 0, "ids.0": 1, "ids.1": 1, "_other": 8}


async def test_bus_metrics_go_to_opentelemetry_when_a_meter_provider_is_set() -> None:
    reader = InMemoryMetricReader()
    store = BusMetricsStore()
    store.enable_opentelemetry(MeterProvider([reader]))
    config = Settings(registry=CollectorRegistry())
    topic = unique()
    async with AgentMessageBus(observer=False) as bus:
        bus._observer = BusObserver(bus, config=config, store=store)
        got = asyncio.Event()
        seen: list[int] = []

        async def handle(msg: Message) -> None:
            seen.append(msg.payload)
            if len(seen) == 4:
                got.set()

        await bus.subscribe(topic, handle)
        for i in range(4):
            await bus.publish(Message(topic=topic, payload=i))
        await wait_for(got)
    points = _otel_points(reader)
    attributes = {"broker": "memory", "pattern": topic}
    assert (attributes, 4) in points["amb.messages.delivered"]
    assert (attributes, 4) in points["amb.handler.succeeded"]
    assert (attributes, 4) in points["amb.handler.duration"]  # histogram count
    assert (attributes, 4) in points["amb.delivery.lag"]
    assert ({"broker": "memory", "topic": topic}, 4) in points["amb.messages.published"]


def _otel_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """metric name -> [(attributes, value or histogram count)]"""
    points: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    points.setdefault(metric.name, []).append((dict(point.attributes), value))
    return points


# --- tracing -----------------------------------------------------------------------------------


@pytest.fixture
def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of this test only (the global one is never set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _assert_one_connected_trace(spans: list[ReadableSpan]) -> ReadableSpan:
    """All spans in one trace, one root, every parent present; returns the root."""
    assert spans
    assert len({s.context.trace_id for s in spans}) == 1, [s.name for s in spans]
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    for span in spans:
        if span.parent is not None:
            assert span.parent.span_id in by_id, f"{span.name}: parent not in the trace"
    return roots[0]


def _ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[str]:
    by_id = {s.context.span_id: s for s in spans}
    names = []
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_one_request_through_three_agents_is_one_trace(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    base = unique()
    broker = MemoryBroker()
    client, a, b, c = (AgentMessageBus(broker) for _ in range(4))
    for bus in (client, a, b, c):
        instrument(bus, tracer_provider=provider)
        await bus.connect()
    noted = asyncio.Event()

    async def agent_a(msg: Message) -> dict[str, Any]:
        answer = await a.request(Message(topic=f"{base}.b", payload=msg.payload), timeout=WAIT)
        await a.publish(Message(topic=f"{base}.c", payload="note",
                                correlation_id=msg.correlation_id))
        return {"a": answer.payload}

    async def agent_c(msg: Message) -> None:
        noted.set()

    await a.subscribe(f"{base}.a", agent_a)
    await b.subscribe(f"{base}.b", lambda msg: msg.payload + 1)
    await c.subscribe(f"{base}.c", agent_c)
    request = Message(topic=f"{base}.a", payload=1)
    reply = await client.request(request, timeout=WAIT)
    assert reply.payload == {"a": 2}
    await wait_for(noted)
    for bus in (client, a, b, c):
        await bus.close()  # drains handlers: every span has ended

    spans = list(exporter.get_finished_spans())
    root = _assert_one_connected_trace(spans)
    assert root.name == f"request {base}.>" and root.kind == SpanKind.CLIENT
    names = {s.name for s in spans}
    assert {f"process {base}.a", f"process {base}.b", f"process {base}.c",
            f"publish {base}.>", "publish _reply", f"request {base}.>"} <= names
    process = {s.name: s for s in spans if s.kind == SpanKind.CONSUMER}
    assert f"process {base}.a" in _ancestors(process[f"process {base}.b"], spans)
    assert f"process {base}.a" in _ancestors(process[f"process {base}.c"], spans)
    # correlation and causation ids are span attributes
    span_a = process[f"process {base}.a"]
    assert span_a.attributes["amb.correlation_id"] == request.id
    assert span_a.attributes["messaging.message.id"] == request.id
    assert span_a.attributes["messaging.system"] == "memory"
    assert process[f"process {base}.c"].attributes["amb.correlation_id"] == request.id
    replies = [s for s in spans if s.name == "publish _reply"]
    assert any(s.attributes.get("amb.causation_id") == request.id for s in replies)
    assert all(s.kind == SpanKind.PRODUCER for s in spans if s.name.startswith("publish"))


async def test_failed_attempts_and_dead_letters_show_in_the_trace(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    topic = unique()
    dead = asyncio.Event()
    async with AgentMessageBus() as bus:
        instrument(bus, tracer_provider=provider)

        async def fail(msg: Message) -> None:
            raise RuntimeError("poison")

        await bus.subscribe(topic, fail, dead_letter_topic=f"{topic}.dlq",
                            retry=RetryPolicy(max_attempts=2, initial_delay=0.0, jitter=0.0))
        await bus.subscribe(f"{topic}.dlq", lambda msg: dead.set())
        await bus.publish(Message(topic=topic, payload=1))
        await wait_for(dead)
    spans = list(exporter.get_finished_spans())
    _assert_one_connected_trace(spans)
    process = next(s for s in spans if s.name == f"process {topic}")
    assert not process.status.is_ok
    assert [e.name for e in process.events].count("exception") == 2
    assert [e.name for e in process.events].count("retry") == 1
    dlq = next(s for s in spans if s.name == f"process {topic}.dlq")
    assert process.name in _ancestors(dlq, spans)


async def test_a_traceparent_set_by_the_caller_is_the_parent(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    topic = unique()
    got = asyncio.Event()
    async with AgentMessageBus() as bus:
        instrument(bus, tracer_provider=provider)
        await bus.subscribe(topic, lambda msg: got.set())
        await bus.publish(Message(topic=topic, payload=1, headers={"traceparent": upstream}))
        await wait_for(got)
    spans = list(exporter.get_finished_spans())
    assert {format(s.context.trace_id, "032x") for s in spans} == {
        "0af7651916cd43dd8448eb211c80319c"
    }


REAL_BROKERS = {
    "redis": ("redis://127.0.0.1:6379/0", 6379),
    "nats": ("nats://127.0.0.1:4222", 4222),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672/", 5672),
}


@pytest.mark.parametrize("name", sorted(REAL_BROKERS))
async def test_request_reply_over_a_real_broker_is_one_trace(
    name: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    url, port = REAL_BROKERS[name]
    require_server(name, "127.0.0.1", port)
    provider, exporter = traced
    topic = unique(f"obs{name}")
    server = AgentMessageBus.from_url(url)
    client = AgentMessageBus.from_url(url)
    for bus in (server, client):
        instrument(bus, tracer_provider=provider)
        await bus.connect()
    try:
        await server.subscribe(topic, lambda msg: {"echo": msg.payload})
        request = Message(topic=topic, payload=5)
        reply = await client.request(request, timeout=WAIT)
        assert reply.payload == {"echo": 5}
    finally:
        await client.close()
        await server.close()
    spans = list(exporter.get_finished_spans())
    root = _assert_one_connected_trace(spans)
    assert root.kind == SpanKind.CLIENT
    process = next(s for s in spans if s.name == f"process {topic}")
    assert process.kind == SpanKind.CONSUMER
    assert process.attributes["messaging.system"] == name
    assert process.attributes["amb.correlation_id"] == request.id
    assert root.name in _ancestors(process, spans)
    reply_span = next(s for s in spans if s.name == "publish _reply")
    assert process.name in _ancestors(reply_span, spans)


# --- logging -----------------------------------------------------------------------------------


def test_json_log_records_mask_secrets_and_carry_extras_and_trace_ids(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = traced
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("amb_core.test_observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with provider.get_tracer("test").start_as_current_span("work") as span:
            logger.info("connecting to %s", "redis://app:s3cret@db:6379/0",
                        extra={"broker_url": "amqp://guest:hunter2@mq/", "attempt": 2})
        try:
            raise ConnectionError("refused by nats://u:topsecret@nats:4222")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "connecting to redis://app:***@db:6379/0"
    assert first["broker_url"] == "amqp://guest:***@mq/"
    assert first["attempt"] == 2
    assert first["logger"] == "amb_core.test_observability" and first["level"] == "INFO"
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert "topsecret" not in second["exception"] and "u:***@nats" in second["exception"]
    assert "s3cret" not in stream.getvalue() and "hunter2" not in stream.getvalue()


COMMAND_OUTPUT = {"cli.py", "bench.py", "demo.py"}  # the `amb` command prints its results


def test_library_code_logs_through_per_module_loggers_and_never_prints() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in COMMAND_OUTPUT:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: print()")
            if (isinstance(func, ast.Attribute) and func.attr == "getLogger"
                    and path.name != "_logging.py"):
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Name) and arg.id == "__name__"):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: getLogger")
    assert not offenders


async def test_histograms_sample_fast_subscriptions_but_counts_stay_exact() -> None:
    store = BusMetricsStore()
    config = Settings(registry=CollectorRegistry())
    topic = unique()
    count = 20_000
    async with AgentMessageBus(observer=False) as bus:
        bus._observer = BusObserver(bus, config=config, store=store)
        done = asyncio.Event()
        seen = 0

        async def handle(msg: Message) -> None:
            nonlocal seen
            seen += 1
            if seen == count:
                done.set()

        sub = await bus.subscribe(topic, handle)
        for i in range(count):
            await bus.publish(Message(topic=topic, payload=i))
        await wait_for(done)
        assert sub._probe is not None and sub._probe._every > 1  # far above 1,000/s here
    stats = store.subscription("memory", topic)
    assert (stats.delivered, stats.succeeded, stats.failed) == (count, count, 0)
    # each timed delivery stands for `every` deliveries: the counts agree within one sample
    assert abs(stats.handler.count - count) < 256
    assert abs(stats.lag.count - count) < 256
    assert 0.0 <= stats.handler.sum / stats.handler.count < 0.1
