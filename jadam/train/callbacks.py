"""Callbacks: small classes with one job each, called by ``Trainer.fit`` between epochs.

``EarlyStopping`` (with best-weights restore), ``ModelCheckpoint``, ``ReduceLROnPlateau``,
``LearningRateScheduler``, ``CSVLogger``, ``TerminateOnNaN`` and ``TensorBoard``. An
epoch is one compiled program, so callbacks see epochs, never single batches.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
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

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...

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


def _need_rate(trainer, who: str) -> float:
    lr = trainer.learning_rate
    if lr is None:
        raise ValueError(
            f"{who} changes the learning rate, which the trainer knows only for an optimizer "
            "given by name: Trainer(model, 'adam', optimizer_options={'learning_rate': ...})"
        )
    trainer._enable_lr_changes()  # before the first epoch compiles: no extra compilation
    return lr


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for
    ``patience`` epochs (Keras' arguments and defaults). The rate is a scale in the
    optimizer state: changing it recompiles nothing. With a schedule, the schedule goes
    on scaled. ``verbose=1`` prints each reduction.
    """

    def __init__(
        self, monitor: str = "val_loss", *, factor: float = 0.1, patience: int = 10,
        mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
        min_lr: float = 0.0, verbose: int = 0,
    ):  # fmt: skip
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor must be in [0, 1), got {factor}")
        for name, v in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not math.isfinite(min_lr) or min_lr < 0:
            raise ValueError(f"min_lr must be a finite number >= 0, got {min_lr}")
        self.monitor, self.factor, self.patience = monitor, float(factor), patience
        self.mode = _mode(monitor, mode)
        self.min_delta, self.cooldown, self.min_lr = abs(min_delta), cooldown, float(min_lr)
        self.verbose = verbose
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait = self.cooldown_counter = 0

    def _better(self, v: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return v < self.best - self.min_delta
        return v > self.best + self.min_delta

    def on_train_begin(self, logs=None):
        _need_rate(self.trainer, "ReduceLROnPlateau")
        self._reset()

    def on_epoch_end(self, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(
                f"ReduceLROnPlateau monitors {self.monitor!r}, which is not among "
                f"{sorted(logs)} (val_* needs validation_data or validation_split)"
            )
        v = float(logs[self.monitor])
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(v):
            self.best, self.wait = v, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = _need_rate(self.trainer, "ReduceLROnPlateau")
                if old > self.min_lr:
                    new = max(old * self.factor, self.min_lr)
                    self.trainer.set_learning_rate(new)
                    if self.verbose:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau: learning rate {new:.4g}")
                self.cooldown_counter, self.wait = self.cooldown, 0


class LearningRateScheduler(Callback):
    """At the start of each epoch set the learning rate to ``schedule(epoch, lr)``
    (``epoch`` counts from 0 over all ``fit`` calls; ``lr`` is the current rate), as
    Keras does. For a rate that changes within epochs, give the optimizer a
    ``jadam.Schedule`` instead."""

    def __init__(self, schedule: Callable[[int, float], float], verbose: int = 0):
        if not callable(schedule):
            raise TypeError(f"schedule must be a function (epoch, lr) -> lr, got {schedule!r}")
        self.schedule, self.verbose = schedule, verbose

    def on_train_begin(self, logs=None):
        _need_rate(self.trainer, "LearningRateScheduler")

    def on_epoch_begin(self, epoch, logs=None):
        lr = self.schedule(epoch, _need_rate(self.trainer, "LearningRateScheduler"))
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise ValueError(
                f"LearningRateScheduler: schedule returned {lr!r}, not a number"
            ) from None
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"LearningRateScheduler: schedule returned {lr} for epoch {epoch}")
        self.trainer.set_learning_rate(lr)
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr:.4g}.")


class CSVLogger(Callback):
    """Write one row per epoch to the CSV file ``path``: ``epoch`` (from 0, as in the
    History) then the History's keys, each row written and flushed at the epoch's end.
    ``append=True`` adds to an existing file (its header is kept) instead of replacing it.
    NaN is written as ``nan``."""

    def __init__(self, path: str | os.PathLike, separator: str = ",", append: bool = False):
        self.path, self.separator, self.append = os.fspath(path), separator, bool(append)
        if os.path.isdir(self.path):
            raise ValueError(f"CSVLogger: {self.path} is a folder; give a file path")
        self._file = self._writer = None
        self._keys: list[str] | None = None

    def on_train_begin(self, logs=None):
        exists = self.append and os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        self._keys = None
        if exists:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), None)
            self._keys = header[1:] if header and header[0] == "epoch" else None
        self._file = open(self.path, "a" if exists else "w", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file, delimiter=self.separator)
        self._header_written = exists and self._keys is not None

    def on_epoch_end(self, epoch, logs):
        if self._keys is None:
            self._keys = list(logs)
        if not self._header_written:
            self._writer.writerow(["epoch", *self._keys])
            self._header_written = True
        self._writer.writerow(
            [epoch, *(repr(float(logs[k])) if k in logs else "" for k in self._keys)]
        )
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class TerminateOnNaN(Callback):
    """Stop training after an epoch whose loss is NaN or infinite (an epoch is one
    compiled program: the check happens at its end, not after the batch that diverged)."""

    def on_epoch_end(self, epoch, logs):
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            print(f"Epoch {epoch + 1}: invalid loss {loss}, terminating training")
            self.trainer.stop_training = True


class TensorBoard(Callback):
    """Write each epoch's numbers as TensorBoard scalars under ``log_dir``: ``train/``
    holds ``epoch_loss``, each metric and ``epoch_lr``, ``validation/`` the ``val_``
    numbers without the prefix (Keras' layout), with the epoch as the step.

    Needs the optional ``tensorboardX`` package (``pip install jadam[tensorboard]``);
    view with ``tensorboard --logdir LOG_DIR``.
    """

    def __init__(self, log_dir: str | os.PathLike = "logs"):
        try:
            import tensorboardX  # noqa: F401  # optional: only this callback needs it
        except ImportError:
            raise ImportError(
                "TensorBoard needs the tensorboardX package: pip install jadam[tensorboard]"
            ) from None
        self.log_dir = os.fspath(log_dir)
        self._writers: dict[str, Any] = {}

    def _writer(self, split: str):
        if split not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[split] = SummaryWriter(os.path.join(self.log_dir, split))
        return self._writers[split]

    def on_epoch_end(self, epoch, logs):
        for k, v in logs.items():
            split, name = ("validation", k[4:]) if k.startswith("val_") else ("train", k)
            self._writer(split).add_scalar(f"epoch_{name}", float(v), epoch)
        for w in self._writers.values():
            w.flush()

    def on_train_end(self, logs=None):
        for w in self._writers.values():
            w.close()
        self._writers = {}
