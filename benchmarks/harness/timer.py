"""The one latency timer of the benchmarks: calls timed in turn (round-robin).

Timing each candidate in turn, rather than one candidate's runs in a row, makes a change of machine
load (another process, clock boost, thermal throttling) hit every candidate alike, so their ratios stay
fair. The timer knows nothing of torch or ONNX Runtime: a caller passes what makes a run finished
(``sync``, e.g. ``torch.cuda.synchronize``) and its own grad or inference-mode context.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence


def round_robin(calls: Sequence[Callable[[], object]], warmup: int, runs: int,
                sync: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds per run of each of ``calls``: ``warmup`` untimed runs of each call, then ``runs`` rounds
    in which every call runs once; ``sync`` (when given) runs after each call, inside the timed span."""
    for call in calls:
        for _ in range(warmup):
            call()
    if sync is not None:
        sync()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if sync is not None:
                sync()
            times[i].append(time.perf_counter() - start)
    return times
