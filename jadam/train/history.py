"""History: per-epoch numbers from ``fit``, saved as JSON and drawn as a PNG."""

from __future__ import annotations

import json
import math
import os


class History:
    """``history`` maps ``"loss"``, each metric and their ``"val_"`` forms to lists, and
    ``"lr"`` to the learning rate at each epoch's end (for an optimizer given by name)."""

    def __init__(
        self, history: dict[str, list[float]] | None = None, epoch: list[int] | None = None
    ):
        self.history: dict[str, list[float]] = {k: list(v) for k, v in (history or {}).items()}
        self.epoch: list[int] = list(epoch or [])

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(int(epoch))
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def extend(self, other: History) -> None:
        for e, i in zip(other.epoch, range(len(other.epoch)), strict=True):
            self.append(e, {k: v[i] for k, v in other.history.items()})

    def to_json(self) -> str:
        # NaN is not JSON: written as null.
        clean = {
            k: [None if (isinstance(x, float) and math.isnan(x)) else x for x in v]
            for k, v in self.history.items()
        }
        return json.dumps({"epoch": self.epoch, "history": clean}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> History:
        d = json.loads(text)
        hist = {k: [float("nan") if x is None else x for x in v] for k, v in d["history"].items()}
        return cls(hist, d["epoch"])

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG: one panel for the loss, one per metric, train and validation."""
        import matplotlib

        matplotlib.use("Agg", force=True)  # no display needed; never opens a window
        import matplotlib.pyplot as plt

        base = [k for k in self.history if not k.startswith("val_")]
        if not base:
            raise ValueError("nothing to plot: the history is empty")
        fig, axes = plt.subplots(1, len(base), figsize=(4.5 * len(base), 3.5), squeeze=False)
        epochs = [e + 1 for e in self.epoch] or list(range(1, len(self.history[base[0]]) + 1))
        for ax, name in zip(axes[0], base, strict=True):
            ax.plot(epochs, self.history[name], label=name)
            if "val_" + name in self.history:
                ax.plot(epochs, self.history["val_" + name], label="val_" + name)
            if name == "lr" and min(self.history[name], default=0) > 0:
                ax.set_yscale("log")  # rates span decades (schedules, reductions)
            ax.set_xlabel("epoch")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"
