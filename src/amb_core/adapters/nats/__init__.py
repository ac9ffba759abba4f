"""NATS (nats-py): core subjects, or JetStream for persistence.

- ``broker.py``: :class:`NATSBroker`, the mapping onto core NATS and the connection;
- ``jetstream.py``: streams, publish acks, durable pull consumers, replay, dead letters;
- ``headers.py``: NATS header blocks, encoded and parsed once per message;
- ``_fast.py``: the fast path, every use of nats-py's private attributes (tested versions only).

See docs/nats.md.
"""

from amb_core.adapters.nats.broker import NATSBroker, flush_in_order

__all__ = ["NATSBroker", "flush_in_order"]
