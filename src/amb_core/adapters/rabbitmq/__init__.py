"""RabbitMQ (AMQP 0-9-1) on aiormq: :class:`RabbitMQBroker`.

- :mod:`.broker`: the mapping (exchange, queues, publish, request/reply, dead letters,
  reconnect through the runtime's supervisor);
- :mod:`.subscriptions`: consumers, their acknowledgements and deliveries;
- :mod:`.naming`: binding keys and queue names;
- :mod:`._fast`: every use of aiormq's internals, on for tested aiormq versions only.
"""

from amb_core.adapters.rabbitmq.broker import RabbitMQBroker
from amb_core.adapters.rabbitmq.naming import binding_key, group_queue_name, keeper_queue_name

__all__ = ["RabbitMQBroker", "binding_key", "group_queue_name", "keeper_queue_name"]
