"""Callbacks: early stopping with best-weights restore, a checkpoint per epoch."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from jadam._sharding import to_host


class Callback:
    """Hooks called by ``Trainer.fit``; ``self.trainer`` is set before training."""

    trainer: Any = None

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs: dict | None = None) -> None: ...

    def on_epoch_end(self, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, logs: dict | None = None) -> None: ...


def _mode(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if any(k in monitor for k in ("acc", "auc")) else "min"


class EarlyStopping(Callback):
    """Stop when ``monitor`` stops improving for ``patience`` epochs.

    With ``restore_best_weights=True`` the parameters of the best epoch are put back
    at the end (a host copy is kept at each improvement: the train state itself is
    donated to XLA and cannot be held on to).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best_weights: bool = True,
    ):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode = _mode(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._best_params = None

    def _better(self, v: float) -> bool:
        if self.mode == "min":
            return v < self.best - self.min_delta
        return v > self.best + self.min_delta

    def on_train_begin(self, logs=None):
        self._wait = 0
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, which is not among {sorted(logs)}"
                " (val_* needs validation_data or validation_split)"
            )
        v = float(logs[self.monitor])
        if self._better(v):
            self.best, self.best_epoch, self._wait = v, epoch, 0
            if self.restore_best_weights:
                self._best_params = to_host(self.trainer.params)
        else:
            self._wait += 1
            if self._wait > self.patience:
                self.stopped_epoch = epoch
                self.trainer.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self._best_params is not None:
            self.trainer.set_params(jax.tree.map(np.asarray, self._best_params))


class ModelCheckpoint(Callback):
    """Save the trainer after every epoch (or only when ``monitor`` improves).

    ``directory`` may contain ``{epoch}``: ``"ckpt/epoch_{epoch:03d}"`` keeps one
    checkpoint per epoch; a plain path is overwritten (atomically) each time.
    """

    def __init__(
        self, directory: str | os.PathLike, *, save_best_only: bool = False,
        monitor: str = "val_loss", mode: str = "auto",
    ):  # fmt: skip
        self.directory = os.fspath(directory)
        self.save_best_only, self.monitor = save_best_only, monitor
        self.mode = _mode(monitor, mode)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.saved: list[str] = []

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            if self.monitor not in logs:
                raise ValueError(
                    f"ModelCheckpoint monitors {self.monitor!r}, not in {sorted(logs)}"
                )
            v = float(logs[self.monitor])
            if not (v < self.best if self.mode == "min" else v > self.best):
                return
            self.best = v
        path = self.directory.format(epoch=epoch + 1)
        self.trainer.save(path)
        self.saved.append(path)
