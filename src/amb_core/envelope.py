"""The wire envelope: CloudEvents 1.0, pure functions from Message to bytes and back.

Binary mode (brokers with headers): the attributes travel as headers named ``prefix + name``
(``ce-id``, ``ce-time`` ...), the content type as ``content-type``, the user's own headers as they
are, and the body is the data alone. Structured mode (brokers without headers): one JSON object
``{"specversion": "1.0", "id": ..., "data": ...}`` with bytes payloads as ``data_base64`` and the
user's headers under the extension ``ambheaders``.

Extensions: ``correlationid``, ``causationid`` (the CloudEvents correlation extension),
``partitionkey`` (the partitioning extension: ``Message.key``), ``ambreplyto`` and
``ambattempt``. W3C ``traceparent`` is an ordinary header.

Decoding never raises anything but :class:`DecodeError`, and only for input that claims to be an
envelope (``specversion`` present) but is broken. Anything else is foreign: it is returned as a
Message whose payload is the raw bytes, with ``headers`` holding what the producer sent.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import orjson

from amb_core.errors import DecodeError
from amb_core.message import Message

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
CONTENT_TYPE = "content-type"
_ATTRIBUTES = (
    "specversion", "id", "source", "type", "time", "correlationid", "causationid",
    "ambreplyto", "ambattempt", "partitionkey",
)

# --- RFC 3339 time, cached per second (formatting a datetime per message costs more than the rest)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_format_cache: tuple[int, str] = (-1, "")
_parse_cache: dict[str, int] = {}


def format_time(timestamp: float) -> str:
    """Unix seconds -> ``2026-11-24T11:52:44.123456Z``."""
    global _format_cache
    micros = round(timestamp * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    cached_second, prefix = _format_cache
    if seconds != cached_second:
        prefix = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _format_cache = (seconds, prefix)
    return f"{prefix}.{fraction:06d}Z"


def parse_time(text: str) -> float:
    """RFC 3339 -> Unix seconds. Fast path for our own format; any RFC 3339 form is accepted."""
    if len(text) == 27 and text[19] == "." and text[26] == "Z":
        seconds = _parse_cache.get(text[:19])
        if seconds is None:
            seconds = int(datetime.fromisoformat(text[:19] + "+00:00").timestamp())
            if len(_parse_cache) > 4096:
                _parse_cache.clear()
            _parse_cache[text[:19]] = seconds
        fraction = text[20:26]
        if fraction.isdigit():
            return (seconds * 1_000_000 + int(fraction)) / 1_000_000
    normalized = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    # Python 3.10's fromisoformat takes only 3 or 6 fraction digits; RFC 3339 allows any.
    normalized = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], normalized)
    moment = datetime.fromisoformat(normalized)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND / 1_000_000


_MICROSECOND = datetime.resolution
_FRACTION = re.compile(r"\.(\d+)")


class _NotJSON(TypeError):
    """What :func:`_json_default` raises: orjson chains it as ``__cause__``, with its type."""

    def __init__(self, value: Any) -> None:
        self.type_name = type(value).__name__
        super().__init__(f"Type is not JSON serializable: {self.type_name}")


def _json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if dump is not None:
        return dump(mode="json")
    raise _NotJSON(value)


_HINT = "(send bytes, or a JSON-able value / pydantic model)"


def _not_json(payload: Any, topic: str | None, exc: orjson.JSONEncodeError) -> TypeError:
    """The error a user can act on: which message, which type, what to send instead."""
    where = "payload" if topic is None else f"payload of message on {topic!r}"
    outer = type(payload).__name__
    cause = exc.__cause__
    if isinstance(cause, _NotJSON):
        what = cause.type_name
        if what != outer:
            what += f" (inside the {outer} payload)"
    else:
        what = f"{outer} ({exc})"
    return TypeError(f"{where} is not JSON-serialisable: {what} {_HINT}")


def encode_data(payload: Any, *, topic: str | None = None) -> tuple[bytes, str]:
    """The body bytes and content type of a payload: bytes pass through, the rest is JSON.

    A payload orjson cannot encode raises TypeError naming ``topic`` (used only for that text)
    and the offending type."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), OCTET_STREAM
    try:
        return orjson.dumps(payload, default=_json_default), JSON
    except orjson.JSONEncodeError as exc:
        raise _not_json(payload, topic, exc) from exc


def _decode_data(body: bytes, content_type: str | None) -> Any:
    if content_type is None or content_type == OCTET_STREAM:
        return body
    if content_type == JSON or content_type.startswith(JSON) or content_type.endswith("+json"):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"content type {content_type}, data not JSON: {exc}") from exc
    return body


# --- binary mode -------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _names(prefix: str) -> tuple[str, ...]:
    """The binary-mode header names for one prefix, built once (this is the hot path)."""
    return tuple(prefix + name for name in _ATTRIBUTES)


def encode_binary(msg: Message, *, prefix: str = "ce-") -> tuple[bytes, dict[str, str]]:
    """Message -> (body, headers) with the CloudEvents attributes as ``prefix``-named headers."""
    body, content_type = encode_data(msg.payload, topic=msg.topic)
    (specversion, id_, source, type_, time_, correlationid, causationid, replyto,
     attempt, partitionkey) = _names(prefix)
    headers = dict(msg.headers) if msg.headers else {}
    headers[specversion] = "1.0"
    headers[id_] = msg.id
    headers[source] = msg.source
    headers[type_] = msg.type
    headers[time_] = format_time(msg.timestamp)
    headers[CONTENT_TYPE] = content_type
    if msg.correlation_id is not None:
        headers[correlationid] = msg.correlation_id
    if msg.causation_id is not None:
        headers[causationid] = msg.causation_id
    if msg.reply_to is not None:
        headers[replyto] = msg.reply_to
    if msg.attempt != 1:
        headers[attempt] = str(msg.attempt)
    if msg.key is not None:
        headers[partitionkey] = msg.key
    return body, headers


def decode_binary(
    body: bytes, headers: dict[str, str], *, topic: str, prefix: str = "ce-"
) -> Message:
    """(body, headers) -> Message. Foreign input (no ``specversion``) comes back raw."""
    names = _names(prefix)
    if names[0] not in headers:
        return Message(topic=topic, payload=bytes(body), headers=dict(headers))
    (_, id_, source, type_, time_, correlationid, causationid, replyto, attempt,
     partitionkey) = names
    get = headers.get
    try:
        msg_id = headers[id_]
        timestamp = get(time_)
        attempts = get(attempt)
        key = get(partitionkey)
        # Usually the headers are exactly the envelope's: skip the filtering pass then.
        envelope_count = 6 + ((correlationid in headers) + (causationid in headers)
                              + (replyto in headers) + (attempts is not None)
                              + (key is not None))
        if len(headers) == envelope_count and CONTENT_TYPE in headers:
            user_headers: dict[str, str] = {}
        else:
            user_headers = {
                key: value for key, value in headers.items()
                if key != CONTENT_TYPE and not key.startswith(prefix)
            }
        return Message(
            topic,
            _decode_data(body, get(CONTENT_TYPE)),
            user_headers,
            get(correlationid),
            get(replyto),
            msg_id,
            parse_time(timestamp) if timestamp else 0.0,
            get(causationid),
            1 if attempts is None else int(attempts),
            get(source, "amb-core"),
            get(type_, "amb.message"),
            None,
            key,
        )
    except DecodeError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DecodeError(f"broken CloudEvents binary envelope: {exc!r}") from exc


# --- structured mode ---------------------------------------------------------------------------


def encode_structured(msg: Message) -> bytes:
    """Message -> one JSON CloudEvent."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": msg.id,
        "source": msg.source,
        "type": msg.type,
        "time": format_time(msg.timestamp),
    }
    payload = msg.payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        event["datacontenttype"] = OCTET_STREAM
        event["data_base64"] = base64.b64encode(payload).decode("ascii")
    else:
        event["datacontenttype"] = JSON
        event["data"] = payload
    if msg.correlation_id is not None:
        event["correlationid"] = msg.correlation_id
    if msg.causation_id is not None:
        event["causationid"] = msg.causation_id
    if msg.reply_to is not None:
        event["ambreplyto"] = msg.reply_to
    if msg.attempt != 1:
        event["ambattempt"] = msg.attempt
    if msg.key is not None:
        event["partitionkey"] = msg.key
    if msg.headers:
        event["ambheaders"] = msg.headers
    try:
        return orjson.dumps(event, default=_json_default)
    except orjson.JSONEncodeError as exc:
        if "data" in event:
            encode_data(payload, topic=msg.topic)  # raises the payload's own error if it is that
        cause = exc.__cause__
        what = cause.type_name if isinstance(cause, _NotJSON) else str(exc)
        raise TypeError(
            f"message on {msg.topic!r} is not JSON-serialisable: {what} outside the payload "
            "(headers and attributes must be strings)"
        ) from exc


def decode_structured(body: bytes, *, topic: str) -> Message:
    """One JSON CloudEvent -> Message. Anything that is not a CloudEvent comes back raw."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Message(topic=topic, payload=bytes(body))
    if not isinstance(event, dict) or "specversion" not in event:
        return Message(topic=topic, payload=bytes(body))
    try:
        if "data_base64" in event:
            payload: Any = base64.b64decode(event["data_base64"], validate=True)
        else:
            payload = event.get("data")
        headers = event.get("ambheaders") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise DecodeError("ambheaders must be an object of strings")
        msg_id = event["id"]
        if not isinstance(msg_id, str):
            raise DecodeError("id must be a string")
        timestamp = event.get("time")
        return Message(
            topic=topic,
            payload=payload,
            headers=headers,
            correlation_id=_optional_str(event, "correlationid"),
            reply_to=_optional_str(event, "ambreplyto"),
            id=msg_id,
            timestamp=parse_time(timestamp) if isinstance(timestamp, str) else 0.0,
            causation_id=_optional_str(event, "causationid"),
            attempt=int(event.get("ambattempt", 1)),
            source=_optional_str(event, "source") or "amb-core",
            type=_optional_str(event, "type") or "amb.message",
            key=_optional_str(event, "partitionkey"),
        )
    except DecodeError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise DecodeError(f"broken CloudEvents structured envelope: {exc!r}") from exc


def _optional_str(event: dict[str, Any], key: str) -> str | None:
    value = event.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"{key} must be a string")
