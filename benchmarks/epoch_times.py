"""Seconds per epoch of a run, from the wall times of its TensorBoard events.

    python benchmarks/epoch_times.py logs/train/runs/<run>/tensorboard

Each epoch ends with Lightning writing `val/loss`: the gaps between those writes are the
epoch times (training and validation). The first includes start-up work (cudnn benchmark).
"""

import statistics
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}).Reload()
ends = [e.wall_time for e in events.Scalars("val/loss")]
gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
if gaps:
    median = statistics.median(gaps)
    print(
        f"epochs logged: {len(ends)}; seconds per epoch after the first: median {median:.2f}, "
        f"min {min(gaps):.2f}, max {max(gaps):.2f}; all gaps: {', '.join(f'{g:.2f}' for g in gaps)}"
    )
    print(f"100 epochs at that median: {100 * median:.0f} s (an extrapolation, not a run)")
else:
    print(f"only {len(ends)} epoch(s) logged: no epoch time")
