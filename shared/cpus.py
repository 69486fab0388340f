"""CPU threads when other work shares the machine (`benchmarks/busy_machine.py`, 2-core CPU, one competitor
running torch with default threads): beside it, a training step ran 3.4x and a decode step 3.7x slower than
alone with default settings, 1.9x and 1.8x with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while
they wait), 2.4x and 2.2x with one thread. Alone, PASSIVE cost 2% (train) and 25% (small decode steps). So a
command that finds the CPUs busy as it starts asks OpenMP for passive threads; an idle machine keeps the default.
"""

from __future__ import annotations

import os
import sys

BUSY_LOAD = 1.0  # 1-minute load average, in CPUs' worth of other work, that counts as busy


def passive_threads_when_busy(command: str) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE if the load average shows other work, before torch (OpenMP) starts: returns
    whether it did. An explicit OMP_WAIT_POLICY wins; once torch is imported the setting would not take effect."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    if load < BUSY_LOAD:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if sys.stderr.isatty():
        cpus = len(os.sched_getaffinity(0))
        print(f"{command}: the CPUs are busy (load {load:.1f} on {cpus}): OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)
    return True
