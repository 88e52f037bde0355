"""Model-load progress bars on the neuron's terminal (nothing when stderr is not a tty)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class LoadBars:
    """One tqdm bar per model and stage while it loads (``download 1.2G/4.0G [12MB/s, 3:50]``,
    then ``load ...``); fed by the load's progress callback."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, tuple[str, tqdm]] = {}

    def update(self, model_id: str, stage: str, done: int, total: int | None, unit: str) -> None:
        if not self.enabled:
            return
        current = self._bars.get(model_id)
        if current is None or current[0] != stage:
            self.close(model_id)
            scale = unit == "bytes"
            # initial=done: a resumed download's rate and ETA count only what arrives now.
            bar = tqdm(total=total, initial=done, desc=f"{stage} {model_id}", unit="B" if scale else f" {unit}",
                       unit_scale=scale, unit_divisor=1024 if scale else 1000, leave=True, file=sys.stderr)
            self._bars[model_id] = (stage, bar)
            return
        bar = current[1]
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close(self, model_id: str) -> None:
        current = self._bars.pop(model_id, None)
        if current is not None:
            current[1].close()
