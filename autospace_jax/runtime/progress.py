"""Progress lines with an ETA, measured on finished work, for every long stage.

JAX dispatches a step and returns before it runs, so a count of dispatched
steps runs ahead of the device and then stalls at the next read: a rate over
such counts swings (clu's ``ReportProgress``, used before, printed "3.2 steps/s,
ETA 2m" and "0.0 steps/s, ETA 3h26m" in turn on one run). Each report here
first waits for the last step's result, so the rate counts work that has
finished; that is one host sync per report interval.

The first unit (step, generation) carries the compile; once a second one has
finished it is left out of the rate. Time the caller names as excluded (the
pieces' compile seconds, which a search pays as each new cell first runs) is
left out too and reported beside the ETA.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging


def format_seconds(seconds: float) -> str:
    """``7s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclasses.dataclass(frozen=True)
class Measure:
    done: int
    total: int
    seconds_per_unit: float
    eta_s: float
    excluded_s: float  # Excluded time so far (e.g. compiling), not in the rate.

    def rate(self, unit: str) -> str:
        """``2.10 steps/s``; slow units as ``8.1 s/generation``."""
        per = self.seconds_per_unit
        return f"{1 / per:.2f} {unit}s/s" if 0 < per < 1 else f"{per:.1f} s/{unit}"

    def eta(self, bound: bool = False) -> str:
        """``ETA 3m05s``; ``bound``: the total is an upper bound (``ETA at most ...``)."""
        return ("ETA at most " if bound else "ETA ") + format_seconds(self.eta_s)

    def scalars(self, unit: str) -> dict[str, float]:
        """The same figures for TensorBoard."""
        return {f"progress/seconds_per_{unit}": self.seconds_per_unit, "progress/eta_s": self.eta_s}

    def text(self, unit: str) -> str:
        """``40/100 (40%), 2.10 steps/s, ETA 28s``."""
        pct = 100 * self.done // max(self.total, 1)
        return f"{self.done}/{self.total} ({pct}%), {self.rate(unit)}, {self.eta()}"


class Progress:
    """Rate and ETA of ``total`` units of work, from the units that have finished.

    Call :meth:`report` after each unit; it logs a line every ``every_secs``.
    :meth:`measure` gives the figures on demand, e.g. for a stage's own
    per-generation line; :meth:`Measure.scalars` the same for TensorBoard.
    """

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        unit: str = "step",
        every_secs: float = 15.0,
        excluded: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.unit, self.every_secs = total, unit, every_secs
        self._excluded = excluded or (lambda: 0.0)
        self._clock = clock
        self._start = (clock(), done, self._excluded())  # (time, done, excluded)
        self._first: tuple[float, int, float] | None = None  # After the first unit finished.
        self._last_report = self._start[0]

    def measure(self, done: int, sync: Any = None) -> Measure:
        """Waits for ``sync`` (the last unit's result), then the rate and ETA."""
        if sync is not None:
            jax.block_until_ready(sync)
        now, excluded = self._clock(), self._excluded()
        if self._first is None:
            self._first = (now, done, excluded)
        t0, d0, e0 = self._first if done > self._first[1] else self._start
        busy = max(now - t0 - (excluded - e0), 1e-9)
        per = busy / max(done - d0, 1)
        m = Measure(done, self.total, per, per * (self.total - done), excluded - self._start[2])
        self._last_report = now
        return m

    def due(self) -> bool:
        """A report is due: after the first unit (it starts the clock), then every
        ``every_secs``."""
        return self._first is None or self._clock() - self._last_report >= self.every_secs

    def report(
        self, done: int, what: str, sync: Any = None, excluded_name: str = ""
    ) -> Measure | None:
        """Logs ``<what> <Measure.text>`` when due (and measures only then); returns the
        figures logged, else None.

        ``excluded_name``: how to name the excluded time in the line, e.g.
        ``compiling``; empty leaves it out.
        """
        if not self.due():
            return None
        first = self._first is None
        m = self.measure(done, sync)
        if first:
            return None  # The first unit only starts the clock: its time holds the compile.
        line = f"{what} {m.text(self.unit)}"
        if excluded_name and m.excluded_s >= 0.05:
            line += f" (+ {m.excluded_s:.1f}s {excluded_name} so far; not in the rate)"
        logging.info("%s", line)
        return m
