"""Error texts that name what failed (issue 11): a payload that cannot be encoded names the
message's topic and the offending type, on the envelope functions and through the bus."""

from __future__ import annotations

from typing import Any

import pytest
from tests.conftest import require_server

from amb_core import AgentMessageBus, Message
from amb_core.envelope import encode_binary, encode_data, encode_structured

HINT = "(send bytes, or a JSON-able value / pydantic model)"


class Opaque:
    pass


ENCODERS = pytest.mark.parametrize("encode", [
    lambda msg: encode_binary(msg),
    lambda msg: encode_binary(msg, prefix="cloudEvents:"),
    lambda msg: encode_structured(msg),
    lambda msg: encode_data(msg.payload, topic=msg.topic),
], ids=["binary", "binary-amqp", "structured", "encode_data"])


@ENCODERS
def test_unserialisable_payload_names_topic_and_type(encode: Any) -> None:
    with pytest.raises(TypeError) as info:
        encode(Message(topic="agents.plan", payload=Opaque()))
    assert str(info.value) == (
        f"payload of message on 'agents.plan' is not JSON-serialisable: Opaque {HINT}"
    )
    assert info.value.__cause__ is not None  # orjson's own error stays attached


@ENCODERS
def test_nested_unserialisable_value_is_named_with_its_container(encode: Any) -> None:
    with pytest.raises(TypeError) as info:
        encode(Message(topic="t", payload={"ids": {1, 2}}))
    assert str(info.value) == (
        f"payload of message on 't' is not JSON-serialisable: set (inside the dict payload) {HINT}"
    )


@ENCODERS
def test_other_json_limits_are_named_too(encode: Any) -> None:
    with pytest.raises(TypeError) as info:
        encode(Message(topic="t", payload={1: "int key"}))
    text = str(info.value)
    assert text.startswith("payload of message on 't' is not JSON-serialisable: dict (")
    assert "Dict key must be str" in text


def test_encode_data_without_topic_still_names_the_type() -> None:
    with pytest.raises(TypeError) as info:
        encode_data(Opaque())
    assert str(info.value) == f"payload is not JSON-serialisable: Opaque {HINT}"


def test_structured_blames_headers_when_the_payload_is_fine() -> None:
    msg = Message(topic="t", payload={"ok": 1}, headers={"bad": Opaque()})  # type: ignore[dict-item]
    with pytest.raises(TypeError) as info:
        encode_structured(msg)
    assert str(info.value).startswith("message on 't' is not JSON-serialisable: ")
    assert "Opaque" in str(info.value)


def test_serialisable_payloads_are_untouched() -> None:
    assert encode_data({"a": [1, 2]}, topic="t") == (b'{"a":[1,2]}', "application/json")
    assert encode_data(b"\x00raw", topic="t") == (b"\x00raw", "application/octet-stream")


async def publish_opaque(url: str) -> TypeError:
    async with AgentMessageBus.from_url(url, observer=False) as bus:
        with pytest.raises(TypeError) as info:
            await bus.publish(Message(topic="agents.plan", payload=Opaque()))
    return info.value


async def test_bus_on_memory_names_the_type() -> None:
    error = await publish_opaque("memory://")
    assert "is not JSON-serialisable: Opaque" in str(error) and HINT in str(error)


async def test_bus_on_memory_names_the_topic() -> None:
    error = await publish_opaque("memory://")
    assert "on 'agents.plan'" in str(error)


@pytest.mark.parametrize(("name", "port", "url"), [
    ("redis", 6379, "redis://127.0.0.1:6379/0"),     # structured JSON envelope
    ("nats", 4222, "nats://127.0.0.1:4222"),         # binary envelope, ce- headers
])
async def test_bus_on_a_real_broker_names_topic_and_type(name: str, port: int, url: str) -> None:
    require_server(name, "127.0.0.1", port)
    error = await publish_opaque(url)
    assert str(error) == (
        f"payload of message on 'agents.plan' is not JSON-serialisable: Opaque {HINT}"
    )
