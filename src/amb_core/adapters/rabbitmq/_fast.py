"""Every use of aiormq's internals, in one place, switched on only for the versions tested.

Two things the public API does not offer at the cost the hot paths need:

- Acknowledgements written as one frame batch per event-loop turn, without a coroutine and a
  drain wait per ack: :class:`FastAckWriter` marshals ``basic.ack`` frames with aiormq's
  ``ChannelFrame.marshall`` and puts them on the channel's ``write_queue`` itself.
  ``tests/test_rabbitmq_wire.py`` checks that the bytes are exactly those aiormq's own
  ``channel.basic_ack`` writes for the same acks.
- The publisher confirms still outstanding on a channel (``channel.confirmations``), which
  ``close()`` waits for.

:func:`enabled` says whether the installed aiormq is one of :data:`TESTED` (``major.minor``);
otherwise the adapter uses :func:`public_ack` (``channel.basic_ack``, one call per frame) and a
round trip on the channel instead, and says so once in the log.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiormq import Channel

logger = logging.getLogger(__name__)

TESTED = frozenset({"7.2"})
"""aiormq versions (``major.minor``) whose internals the tests ran against."""

_logged = False


def client_version() -> str:
    try:
        return importlib.metadata.version("aiormq")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "unknown"


def enabled(wanted: bool = True, version: str | None = None) -> bool:
    """Whether to use the fast path: ``wanted`` (the adapter's ``fast_path`` option) and the
    client's ``major.minor`` in :data:`TESTED`. Logs the choice once per process."""
    global _logged
    version = client_version() if version is None else version
    tested = ".".join(version.split(".")[:2]) in TESTED
    on = wanted and tested
    if not _logged:
        _logged = True
        if on:
            logger.debug("aiormq %s: acks written as frame batches (fast path)", version)
        elif wanted:
            logger.info("aiormq %s is not among the tested versions %s: acks go through "
                        "channel.basic_ack (public API)", version, sorted(TESTED))
        else:
            logger.debug("aiormq %s: fast path switched off, acks through channel.basic_ack",
                         version)
    return on


class FastAckWriter:
    """Writes one turn's acks of one channel as one frame batch on its write queue."""

    __slots__ = ("_ack", "_channel", "_marshall")

    def __init__(self, channel: Channel) -> None:
        from aiormq.abc import ChannelFrame
        from pamqp.commands import Basic

        self._channel = channel
        self._ack = Basic.Ack
        self._marshall = ChannelFrame.marshall

    def write(self, tags: list[int], top: int) -> Awaitable[None] | None:
        """``top``: one ``basic.ack multiple`` up to it; 0: one ``basic.ack`` per tag.

        Returns None once the frame is queued; an awaitable when the write queue (10 frames)
        is full: the caller (an :class:`~amb_core.runtime.AckBatcher`) waits for it before it
        writes the next batch, so a later ack never overtakes an earlier one.
        """
        ack = self._ack
        frames = [ack(delivery_tag=top, multiple=True)] if top else [
            ack(delivery_tag=tag) for tag in tags
        ]
        channel = self._channel
        frame = self._marshall(channel_number=channel.number, frames=frames)
        queue = channel.write_queue
        try:
            queue.put_nowait(frame)
        except asyncio.QueueFull:
            return queue.put(frame)
        return None


async def public_ack(channel: Channel, tags: list[int], top: int) -> None:
    """The same acks through aiormq's public ``basic_ack``, one call (and drain) per frame."""
    if top:
        await channel.basic_ack(top, multiple=True)
        return
    for tag in tags:
        await channel.basic_ack(tag)


def unconfirmed(channel: Channel) -> list[asyncio.Future[Any]]:
    """The publisher confirms the channel still waits for."""
    return [future for future in channel.confirmations.values()
            if isinstance(future, asyncio.Future) and not future.done()]
