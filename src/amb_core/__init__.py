"""amb-core: the Agent Message Bus. One asyncio API over any message broker."""

from amb_core._version import __version__
from amb_core.broker import Broker, Capabilities, Delivery
from amb_core.bus import AgentMessageBus, Gathered, Subscription
from amb_core.conversation import current_message, remaining
from amb_core.errors import (
    AmbError,
    BrokerConnectionError,
    DecodeError,
    MissingDependency,
    NoResponders,
    NotConnected,
    RemoteError,
    RequestTimeout,
    UnsupportedFeature,
)
from amb_core.message import Message
from amb_core.retry import RetryPolicy

__all__ = [
    "AgentMessageBus",
    "AmbError",
    "Broker",
    "BrokerConnectionError",
    "Capabilities",
    "DecodeError",
    "Delivery",
    "Gathered",
    "Message",
    "MissingDependency",
    "NoResponders",
    "NotConnected",
    "RemoteError",
    "RequestTimeout",
    "RetryPolicy",
    "Subscription",
    "UnsupportedFeature",
    "__version__",
    "current_message",
    "remaining",
]
