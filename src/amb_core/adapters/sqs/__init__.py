"""Amazon SQS with SNS fan-out (aiobotocore): :class:`AWSSQSBroker`. docs/sqs.md describes
what it creates on AWS, when it goes away and how to remove it.

- :mod:`.broker`: the mapping (topic, queues, publish, dead letters, groups, reconnect)
- :mod:`.subscriptions`: receive loops, deliveries, their leases and deletes
- :mod:`.batches`: concurrent sends gathered into batch calls
- :mod:`.naming`: queue names and SNS filter policies
- :mod:`.payloads`: large bodies in S3 with the AWS extended clients' pointer
"""

from amb_core.adapters.sqs.broker import AWSSQSBroker
from amb_core.adapters.sqs.naming import filter_policy, queue_name

__all__ = ["AWSSQSBroker", "filter_policy", "queue_name"]
