"""What amb writes to and reads from Redis, byte for byte: the publish script, RESP packing,
PSUBSCRIBE globs, stream entries. No I/O here."""

from __future__ import annotations

import hashlib

import orjson

# KEYS[1] stream key; ARGV: channel, body, maxlen ("0" = no trimming), force ("1" = always XADD).
PUBLISH_SCRIPT = b"""\
redis.call('PUBLISH', ARGV[1], ARGV[2])
if ARGV[4] == '1' or redis.call('TYPE', KEYS[1]).ok == 'stream' then
  if ARGV[3] == '0' then
    redis.call('XADD', KEYS[1], '*', 'data', ARGV[2])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2])
  end
  return 1
end
return 0
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode()
DATA = b"data"


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack(*args: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def publish_head(channel: bytes, stream_key: bytes, maxlen: int, force: bool,
                 script: bool) -> tuple[bytes, bytes]:
    """The bytes before and after the body of one publish command: ``EVALSHA`` of the publish
    script (``script``), else a plain ``PUBLISH`` (reply inboxes). The body goes between."""
    if not script:
        return b"*3\r\n$7\r\nPUBLISH\r\n" + bulk(channel), b""
    return (
        b"*8\r\n$7\r\nEVALSHA\r\n" + bulk(PUBLISH_SHA) + b"$1\r\n1\r\n" + bulk(stream_key)
        + bulk(channel),
        bulk(str(maxlen).encode()) + (b"$1\r\n1\r\n" if force else b"$1\r\n0\r\n"),
    )


def glob(pattern: str) -> bytes:
    """amb pattern -> PSUBSCRIBE glob: literal segments escaped, ``*``/``>`` as ``*``."""
    parts = []
    for segment in pattern.split("."):
        if segment in ("*", ">"):
            parts.append("*")
        else:
            parts.append("".join("\\" + c if c in "*?[]\\" else c for c in segment))
    return ".".join(parts).encode()


def entry_body(fields: list[bytes] | dict[bytes, bytes]) -> bytes:
    """A stream entry's message: our ``data`` field, else (a foreign producer's entry) all of
    its fields as one JSON object, which the bus hands over as raw bytes."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    body = fields.get(DATA)
    if body is not None:
        return body
    return orjson.dumps({
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()
    })


def stream_id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream id as a sortable pair (``b"1700000000000-3"`` -> ``(1700000000000, 3)``)."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _arguments(packed: bytes, count: int) -> list[bytes]:
    """The first ``count`` bulk strings of a packed command."""
    args: list[bytes] = []
    pos = packed.index(b"\r\n") + 2
    while len(args) < count:
        end = packed.index(b"\r\n", pos)
        start = end + 2
        size = int(packed[pos + 1:end])
        args.append(packed[start:start + size])
        pos = start + size + 2
    return args


def command_key(packed: bytes) -> bytes:
    """What a packed command of the writer routes by on a Redis Cluster: the first key of an
    ``EVALSHA``/``EVAL``, else the first argument (``XACK``'s stream, ``PUBLISH``'s channel)."""
    name, first = _arguments(packed, 2)
    if name in (b"EVALSHA", b"EVAL"):
        return _arguments(packed, 4)[3]
    return first


def wait_command(replicas: int, timeout: float) -> bytes:
    """``WAIT replicas timeout-ms``: block until the connection's earlier writes reached
    ``replicas`` replicas (or the timeout); the reply is how many did."""
    return pack(b"WAIT", str(replicas).encode(), str(max(int(timeout * 1000), 1)).encode())
