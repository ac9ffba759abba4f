"""The Kafka adapter (confluent-kafka / librdkafka): a Kafka topic per amb topic, Kafka
consumer groups, ordering keys, replay from the log. See docs/kafka.md."""

from amb_core.adapters.kafka.broker import KafkaBroker

__all__ = ["KafkaBroker"]
