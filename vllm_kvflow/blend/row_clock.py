"""Seconds per row of the blend passes, measured as they run: what turns a step's time
budget (max_blend_ms_per_step, CPU engines) into rows. Pure Python, no torch."""
from __future__ import annotations

import contextlib
import time
from typing import Callable


class RowClock:
    """Seconds per row of each kind of pass ("isolated", "blend"), averaged over recent
    passes on this machine: what turns a step's seconds into rows. A pass's fixed cost
    makes small passes dear per row, so the rows it allows settle where a pass takes
    about the seconds given."""

    SMOOTHING = 0.3  # weight of the newest pass
    # Rows of a kind's first timed pass, before anything is measured: few, so that the
    # first pass is short whatever the machine; the next passes grow to the seconds.
    FIRST_ROWS = 32

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self._per_row: dict[str, float] = {}

    def rows_for(self, kind: str, seconds: float | None, cap: float) -> float:
        """Rows of `kind` that fit in `seconds` (None: no time bound), at most cap."""
        if seconds is None:
            return cap
        rate = self._per_row.get(kind)
        if rate is None:
            return min(cap, self.FIRST_ROWS)
        return max(1, min(cap, int(seconds / rate)))

    @contextlib.contextmanager
    def timing(self, kind: str, rows: Callable[[], float]):
        """Time the block; rows() (read after it) is how many rows it ran."""
        start = self.now()
        yield
        n = rows()
        if n > 0:
            per_row = (self.now() - start) / n
            old = self._per_row.get(kind)
            self._per_row[kind] = per_row if old is None else (
                self.SMOOTHING * per_row + (1 - self.SMOOTHING) * old)
