"""What every adapter needs, written once, below the adapters and above the contract.

- :class:`Buffer`, :class:`Pump`, :class:`DropReport`: a bounded buffer and the task that
  empties it into the bus; backpressure where the broker keeps what we do not take, drops with
  one slow-consumer report where the server pushes regardless.
- :class:`Supervisor`, :class:`ReconnectPolicy`, :class:`Backoff`: connect, reconnect with
  capped exponential backoff and jitter, restore subscriptions; one set of options everywhere.
- :class:`Deadlines`, :class:`PendingReplies`: many timeouts on one timer; requests waiting
  for their replies.
- :class:`LeaseKeeper`: keeps in-flight messages' leases alive while their handlers run.
- :class:`AckBatcher`: acknowledgements of one event-loop turn sent as one batch.
- :class:`ErrorMap`: a client library's exceptions mapped to amb's, once per adapter.
- :class:`OnDemand`: an inbox or listener opened on first use, once.

Nothing here imports an adapter, the bus or a broker client library.
"""

from amb_core.runtime.acks import AckBatcher
from amb_core.runtime.buffer import Buffer
from amb_core.runtime.deadlines import Deadlines, PendingReplies
from amb_core.runtime.errors import ErrorMap
from amb_core.runtime.leases import LeaseKeeper
from amb_core.runtime.ondemand import OnDemand
from amb_core.runtime.pump import DropReport, Pump
from amb_core.runtime.supervisor import Backoff, ReconnectPolicy, Supervisor

__all__ = [
    "AckBatcher",
    "Backoff",
    "Buffer",
    "Deadlines",
    "DropReport",
    "ErrorMap",
    "LeaseKeeper",
    "OnDemand",
    "PendingReplies",
    "Pump",
    "ReconnectPolicy",
    "Supervisor",
]
