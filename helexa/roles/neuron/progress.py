"""Model-load progress bars on the neuron's terminal (nothing when stderr is not a tty)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class LoadBars:
    """One tqdm bar per model while it loads; fed by the backend's progress callback."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, tqdm] = {}

    def update(self, model_id: str, stage: str, done: int, total: int | None, unit: str) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(model_id)
        if bar is None:
            scale = unit == "bytes"
            bar = tqdm(total=total, desc=f"loading {model_id}", unit="B" if scale else f" {unit}",
                       unit_scale=scale, unit_divisor=1024 if scale else 1000, leave=True, file=sys.stderr)
            self._bars[model_id] = bar
        if total and bar.total != total:
            bar.total = total
        bar.set_postfix_str(stage, refresh=False)
        bar.n = done
        bar.refresh()

    def close(self, model_id: str) -> None:
        bar = self._bars.pop(model_id, None)
        if bar is not None:
            bar.close()
