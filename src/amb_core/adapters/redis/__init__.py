"""The Redis adapter (redis-py asyncio): pub/sub for plain subscriptions, Streams for consumer
groups, replay and dead letters. docs/redis.md describes what it does on the server.

- :mod:`.broker`: :class:`RedisBroker`, publish, groups' and dead letters' state, replay
- :mod:`.writer`: the one pipelined writer of publishes and acknowledgements
- :mod:`.pubsub`: plain subscriptions on one pub/sub connection
- :mod:`.groups`: consumer-group members on Streams
- :mod:`.protocol`: the publish script and RESP bytes
- :mod:`._fast`: redis-py internals, on only for tested versions
"""

from amb_core.adapters.redis.broker import RedisBroker

__all__ = ["RedisBroker"]
