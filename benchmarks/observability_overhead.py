"""Overhead of the built-in bus metrics on the memory broker's throughput.

The workload is ``amb bench``'s (src/amb_core/bench.py): a plain ``await bus.publish(Message(
topic, {"i": i}))`` loop, the clock stopping when one counting subscriber has all N. Runs
alternate metrics off / on in one process, so drift and noise hit both alike; the medians are
compared. Tracing is off (no tracer provider), as it is unless you configure OpenTelemetry.

    python benchmarks/observability_overhead.py [--messages 200000] [--runs 9]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from amb_core import bench
from amb_core.observability import configure


async def one(messages: int, metrics_on: bool) -> tuple[float, float]:
    """(messages per wall-clock second, messages per CPU second) of one run."""
    configure(bus_metrics=metrics_on)
    gc.collect()
    cpu = time.process_time()
    result = await bench.throughput("memory://", messages)
    cpu = time.process_time() - cpu
    return result.rate, messages / cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=9, help="runs of each, alternating")
    args = parser.parse_args()
    await one(min(args.messages, 20_000), True)  # warm-up (imports, first labels)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(args.runs):
        # alternate which goes first, so neither always runs on a warmer process
        order = (False, True) if i % 2 == 0 else (True, False)
        for metrics_on in order:
            runs[metrics_on].append(await one(args.messages, metrics_on))
    configure(bus_metrics=None)
    print(f"memory broker, {args.messages:,} messages, {args.runs} alternating runs each")
    print(f"{'metrics':<8} {'median msg/s':>13} {'min':>9} {'max':>9}   {'median msg/CPU-s':>16}")
    medians = {}
    for metrics_on, name in ((False, "off"), (True, "on")):
        wall = [w for w, _ in runs[metrics_on]]
        cpu = [c for _, c in runs[metrics_on]]
        medians[metrics_on] = statistics.median(wall), statistics.median(cpu)
        print(f"{name:<8} {medians[metrics_on][0]:>13,.0f} {min(wall):>9,.0f} {max(wall):>9,.0f}"
              f"   {medians[metrics_on][1]:>16,.0f}")
    print(f"overhead of metrics: {1 - medians[True][0] / medians[False][0]:.1%} of wall-clock"
          f" throughput, {1 - medians[True][1] / medians[False][1]:.1%} of CPU throughput")


if __name__ == "__main__":
    asyncio.run(main())
