"""Azure Service Bus on the official SDK (``azure.servicebus.aio``): :class:`AzureServiceBusBroker`.

- :mod:`.broker`: the mapping (one Service Bus topic, subscriptions and their rules through the
  administration client, publish, dead-letter keepers, consumer-group state);
- :mod:`.subscriptions`: PEEK_LOCK receivers, settlement, lock renewal, deliveries;
- :mod:`.rules`: subscription names and the filters that route amb topics.

The adapter uses the SDK's public API only, so it has no ``_fast`` module.
"""

from amb_core.adapters.azure.broker import AzureServiceBusBroker
from amb_core.adapters.azure.rules import (
    TOPIC_PROPERTY,
    group_subscription_name,
    keeper_subscription_name,
    sql_filter,
)

__all__ = [
    "TOPIC_PROPERTY",
    "AzureServiceBusBroker",
    "group_subscription_name",
    "keeper_subscription_name",
    "sql_filter",
]
