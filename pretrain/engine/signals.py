"""Stop cleanly on a signal or a time limit: the trainer saves a checkpoint and exits.

SIGTERM (Slurm's preemption / time-limit warning with ``#SBATCH --signal=B:TERM@120``, or ``scancel``), SIGUSR1
(``--signal=USR1@120``) and SIGUSR2 (``--signal=USR2@120``; the Slurm scripts forward both user signals) set a
flag; the training loop checks it once per step, all ranks agree on it with a MAX all-reduce (one rank receiving
the signal is enough), then every rank saves and leaves the loop.
``ExitTimer`` does the same after ``--exit-duration-in-mins`` of wall time.
"""
from __future__ import annotations

import signal
import time
from typing import Iterable, Optional

from pretrain.engine.dist import all_reduce_max


class StopRequest:
    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2),
                 exit_duration_mins: Optional[float] = None):
        self.received: Optional[int] = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)
        self.start = time.time()
        self.exit_duration_mins = exit_duration_mins

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def local_reason(self) -> Optional[str]:
        if self.received is not None:
            return signal.Signals(self.received).name
        if self.exit_duration_mins and (time.time() - self.start) / 60.0 >= self.exit_duration_mins:
            return f"exit duration {self.exit_duration_mins} min reached"
        return None

    def should_stop(self) -> Optional[str]:
        """A reason to stop if any rank has one (collective: every rank must call it at the same point)."""
        local = self.local_reason()
        code = 0.0
        if local is not None:
            code = 1.0 if self.received is None else 2.0 + float(self.received)
        agreed = all_reduce_max(code)
        if agreed == 0.0:
            return None
        if agreed == 1.0:
            return local or f"exit duration {self.exit_duration_mins} min reached"
        return f"signal {signal.Signals(int(agreed - 2.0)).name}"

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
