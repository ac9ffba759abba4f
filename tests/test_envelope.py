"""The wire envelope on its own: round trips, foreign input, fuzzed input."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from amb_core import DecodeError, Message
from amb_core.envelope import (
    decode_binary,
    decode_structured,
    encode_binary,
    encode_structured,
    format_time,
    parse_time,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
header_maps = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=12).filter(
        lambda k: not k.startswith("ce-") and k != "content-type"
    ),
    st.text(max_size=20),
    max_size=4,
)


def sample() -> Message:
    return Message(topic="agents.task", payload={"action": "analyze", "n": [1, 2.5, None]},
                   headers={"x-tenant": "acme", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16
                            + "-01"},
                   correlation_id="corr-1", reply_to="_amb.inbox.x", causation_id="cause-1",
                   attempt=3, source="agent://planner", type="task.created")


@pytest.mark.parametrize("codec", ["binary", "structured"])
def test_round_trip_keeps_every_field(codec: str) -> None:
    msg = sample()
    if codec == "binary":
        body, headers = encode_binary(msg)
        back = decode_binary(body, headers, topic=msg.topic)
    else:
        back = decode_structured(encode_structured(msg), topic=msg.topic)
    assert back == msg
    assert back.timestamp == msg.timestamp


def test_binary_mode_is_cloudevents_with_a_prefix() -> None:
    msg = sample()
    body, headers = encode_binary(msg, prefix="ce_")
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_id"] == msg.id
    assert headers["ce_type"] == "task.created"
    assert headers["ce_correlationid"] == "corr-1"
    assert headers["content-type"] == "application/json"
    assert headers["x-tenant"] == "acme"
    assert orjson.loads(body) == {"action": "analyze", "n": [1, 2.5, None]}
    datetime.fromisoformat(headers["ce_time"].replace("Z", "+00:00"))  # RFC 3339


def test_structured_mode_is_a_cloudevent() -> None:
    event = orjson.loads(encode_structured(sample()))
    assert event["specversion"] == "1.0"
    assert event["data"] == {"action": "analyze", "n": [1, 2.5, None]}
    assert event["datacontenttype"] == "application/json"
    assert event["ambheaders"]["x-tenant"] == "acme"


@pytest.mark.parametrize("payload", [b"", b"\x00\xff\xfe binary", bytearray(b"ba")])
def test_bytes_pass_through_untouched(payload: bytes) -> None:
    msg = Message(topic="t", payload=payload)
    body, headers = encode_binary(msg)
    assert body == bytes(payload)
    assert headers["content-type"] == "application/octet-stream"
    assert decode_binary(body, headers, topic="t").payload == bytes(payload)
    event = orjson.loads(encode_structured(msg))
    assert base64.b64decode(event["data_base64"]) == bytes(payload)
    assert decode_structured(encode_structured(msg), topic="t").payload == bytes(payload)


def test_pydantic_payload_is_sent_as_json() -> None:
    class Task(BaseModel):
        action: str
        when: datetime

    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    msg = Message(topic="t", payload=Task(action="analyze", when=moment))
    body, headers = encode_binary(msg)
    back = decode_binary(body, headers, topic="t")
    assert back.payload == {"action": "analyze", "when": "2026-01-02T03:04:05Z"}
    assert back.payload_as(Task) == Task(action="analyze", when=moment)


def test_unserialisable_payload_fails_at_encode() -> None:
    with pytest.raises(TypeError):
        encode_binary(Message(topic="t", payload=object()))


def test_foreign_input_comes_back_raw() -> None:
    raw = decode_binary(b'{"a": 1}', {"x-foreign": "yes"}, topic="t")
    assert raw.payload == b'{"a": 1}'
    assert raw.headers == {"x-foreign": "yes"}
    for body in (b"\xff\xfe", b"[1, 2]", b'{"no": "specversion"}', b"", b"null"):
        assert decode_structured(body, topic="t").payload == body


@pytest.mark.parametrize("headers,body", [
    ({"ce-specversion": "1.0"}, b"{}"),  # no id
    ({"ce-specversion": "1.0", "ce-id": "1", "content-type": "application/json"}, b"{oops"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-time": "yesterday"}, b""),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-ambattempt": "many"}, b""),
])
def test_broken_binary_envelope_is_a_decode_error(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_binary(body, headers, topic="t")


@pytest.mark.parametrize("event", [
    {"specversion": "1.0"},
    {"specversion": "1.0", "id": 5},
    {"specversion": "1.0", "id": "1", "data_base64": "not base64!"},
    {"specversion": "1.0", "id": "1", "ambheaders": {"k": 1}},
    {"specversion": "1.0", "id": "1", "time": "never"},
    {"specversion": "1.0", "id": "1", "correlationid": ["x"]},
])
def test_broken_structured_envelope_is_a_decode_error(event: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode_structured(orjson.dumps(event), topic="t")


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), headers=st.dictionaries(st.text(max_size=15),
                                                             st.text(max_size=30), max_size=6))
def test_fuzzed_binary_input_never_escapes_but_as_decode_error(
    body: bytes, headers: dict[str, str]
) -> None:
    for candidate in (headers, {**headers, "ce-specversion": "1.0"},
                      {**headers, "ce-specversion": "1.0", "ce-id": "x",
                       "content-type": "application/json"}):
        try:
            msg = decode_binary(body, candidate, topic="t")
        except DecodeError:
            continue
        assert msg.topic == "t"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(orjson.dumps)
       | st.dictionaries(st.sampled_from(["specversion", "id", "time", "data", "data_base64",
                                          "ambheaders", "ambattempt", "correlationid"]),
                         json_values, max_size=6).map(orjson.dumps))
def test_fuzzed_structured_input_never_escapes_but_as_decode_error(body: bytes) -> None:
    try:
        msg = decode_structured(body, topic="t")
    except DecodeError:
        return
    assert msg.topic == "t"


@settings(max_examples=200, deadline=None)
@given(payload=json_values, headers=header_maps, correlation=st.none() | st.text(max_size=10))
def test_round_trip_property(payload: object, headers: dict[str, str],
                             correlation: str | None) -> None:
    msg = Message(topic="p.q", payload=payload, headers=headers, correlation_id=correlation)
    body, wire_headers = encode_binary(msg)
    assert decode_binary(body, wire_headers, topic="p.q") == msg
    assert decode_structured(encode_structured(msg), topic="p.q") == msg


@settings(max_examples=200, deadline=None)
@given(micros=st.integers(0, 4_102_444_800_000_000))
def test_time_round_trip(micros: int) -> None:
    timestamp = micros / 1_000_000
    assert parse_time(format_time(timestamp)) == timestamp


def test_parse_time_accepts_other_rfc3339_forms() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 1.0
    assert parse_time("1970-01-01T01:00:01.5+01:00") == 1.5


def test_ordering_key_travels_as_partitionkey_in_both_modes() -> None:
    msg = Message(topic="orders", payload={"n": 1}, key="customer-7")
    body, headers = encode_binary(msg, prefix="ce_")
    assert headers["ce_partitionkey"] == "customer-7"
    decoded = decode_binary(body, headers, topic="orders", prefix="ce_")
    assert decoded.key == "customer-7" and decoded.headers == {}
    structured = decode_structured(encode_structured(msg), topic="orders")
    assert structured.key == "customer-7"
    assert orjson.loads(encode_structured(msg))["partitionkey"] == "customer-7"
    plain, plain_headers = encode_binary(Message(topic="orders", payload=1), prefix="ce_")
    assert "ce_partitionkey" not in plain_headers
    assert decode_binary(plain, plain_headers, topic="orders", prefix="ce_").key is None
    assert msg.copy().key == "customer-7"


async def test_ordering_key_reaches_the_handler_in_process() -> None:
    from amb_core import AgentMessageBus

    got: list[Message] = []
    async with AgentMessageBus(observer=False) as bus:
        done = asyncio.Event()

        async def handle(m: Message) -> None:
            got.append(m)
            done.set()

        await bus.subscribe("orders", handle)
        await bus.publish(Message(topic="orders", payload=1, key="k-1"))
        await asyncio.wait_for(done.wait(), 5)
        assert got[0].key == "k-1"
        assert [m.key async for m in bus.replay("orders")] == ["k-1"]
