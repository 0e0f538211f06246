"""Progress of a long command on stderr: a tqdm bar on a terminal, periodic log lines otherwise.

A bar redrawn several times a second is right for a person at a terminal and wrong for a log file (a batch
job, ``cmd 2> log``, a pipe): there the progress is one line every ``interval`` seconds (30 by default) with
what is done, the rate and the time left, e.g.::

    preprocess.py: encoding: 120.5 of 498.0 MB (24%), 61.2 MB/s, 20,110 docs/s | elapsed 0:00:02, ETA 0:00:06

Both forms go to stderr, so stdout keeps only results.  Used by the data tools and the evaluation command.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _amount(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 1e6:,.1f}"
    return f"{value:,.0f}"


class Progress:
    """Progress over ``total`` units (``unit="B"``: bytes, shown in MB; anything else is a count).

    ``enabled=False`` prints nothing.  ``tty`` (default: whether ``stream`` is a terminal) picks the tqdm bar;
    otherwise a line is printed every ``interval`` seconds, none at all for a job shorter than that.
    ``postfix()`` may return extra text (e.g. documents per second).  A context manager: on success a tqdm bar
    stays, on an error it is cleared so that the error message stands alone on its line.
    """

    def __init__(self, prog: str, desc: str, total: Optional[float], unit: str = "B", enabled: bool = True,
                 interval: float = 30.0, postfix: Optional[Callable[[], str]] = None, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None):
        self.prog, self.desc, self.total, self.unit = prog, desc, total, unit
        self.enabled, self.interval, self.postfix = enabled, interval, postfix
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.count = 0  # a second tally (e.g. documents) for ``postfix`` to show
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and (self.stream.isatty() if tty is None else tty):
            import tqdm
            tqdm.tqdm.monitor_interval = 0  # no monitor thread: worker processes may be forked
            scale = unit == "B"
            self.bar = tqdm.tqdm(total=total, desc=desc, unit=unit if scale else f" {unit}", unit_scale=scale,
                                 file=self.stream, mininterval=0.5, dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, n: float) -> None:
        """``n`` more units done."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            if self.postfix is not None:
                self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The periodic log line: done of total (share), rate, postfix, elapsed time and time left."""
        secs = max(self.elapsed(), 1e-9)
        rate = self.done / secs
        unit = "MB" if self.unit == "B" else self.unit
        done = _amount(self.done, self.unit)
        if self.total:
            done += f" of {_amount(self.total, self.unit)} {unit} ({100 * self.done / self.total:.0f}%)"
        else:
            done += f" {unit}"
        parts = [done, f"{_amount(rate, self.unit)} {unit}/s"]
        if self.postfix is not None:
            parts.append(self.postfix())
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        return f"{self.prog}: {self.desc}: {', '.join(parts)} | elapsed {_duration(secs)}{eta}"

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.leave = ok
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc_type is None)
