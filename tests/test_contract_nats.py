"""The contract suite on NATSBroker, core NATS and JetStream, against the real server.

The shared server (127.0.0.1:4222, JetStream enabled) serves every case but reconnect, which
restarts a private nats-server (its own port and -sd directory) mid-stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tests.conftest import require_server
from tests.servers import PrivateNATS

from amb_core.adapters.nats import NATSBroker, flush_in_order
from amb_core.runtime import ReconnectPolicy
from amb_core.testing import BrokerContract

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"
# Short enough that a crashed member's message comes back within the suite's waits.
TEST_ACK_WAIT = 3.0
TEST_STREAM_MAX_AGE = 3600.0


def make_broker(url: str, jetstream: bool, **options: object) -> NATSBroker:
    if jetstream:
        options.setdefault("ack_wait", TEST_ACK_WAIT)
        options.setdefault("stream_max_age", TEST_STREAM_MAX_AGE)
    return NATSBroker(servers=[url], use_jetstream=jetstream, **options)  # type: ignore[arg-type]


class _NATSContract(BrokerContract):
    jetstream = False
    fast_path = True
    wait = 10.0
    redelivery_wait = 15.0

    @pytest.fixture
    def broker_factory(self) -> Callable[[], NATSBroker]:
        require_server("nats", HOST, PORT)
        return lambda: make_broker(URL, self.jetstream, fast_path=self.fast_path)

    @pytest.fixture
    async def raw_publish(self) -> AsyncIterator[Callable[[str, bytes, dict[str, str]],
                                                           Awaitable[None]]]:
        import nats

        require_server("nats", HOST, PORT)
        nc = await nats.connect(URL)

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            await nc.publish(topic, body, headers=headers or None)
            # At the server before the bus publishes (nc.flush() alone can overtake the PUB).
            await flush_in_order(nc)

        yield publish
        await nc.close()

    @pytest.fixture
    def restartable(
        self, private_nats: PrivateNATS
    ) -> tuple[Callable[[], NATSBroker], Callable[[], Awaitable[None]]]:
        return (
            lambda: make_broker(private_nats.url, self.jetstream, fast_path=self.fast_path,
                                reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.2)),
            private_nats.restart,
        )


class TestNATSCoreContract(_NATSContract):
    """Core NATS: at-most-once, no persistence, no replay (the suite skips those cases)."""

    jetstream = False


class TestNATSJetStreamContract(_NATSContract):
    """JetStream: persistent groups (durable pull consumers), redelivery, replay."""

    jetstream = True


class TestNATSCoreContractPublicAPI(_NATSContract):
    """Core mode through nats-py's public API only (``fast_path=False``: what the adapter
    falls back to when a nats-py version lacks the internals the fast path uses)."""

    jetstream = False
    fast_path = False


class TestNATSJetStreamContractPublicAPI(_NATSContract):
    """JetStream mode through nats-py's public API only (``fast_path=False``)."""

    jetstream = True
    fast_path = False
