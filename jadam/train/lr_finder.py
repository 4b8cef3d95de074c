"""The learning-rate range test (Smith 2017; fastai's ``lr_find``).

``Trainer.find_lr`` trains a copy of the model for ``steps`` batches while the
learning rate grows exponentially from ``start`` to ``end``, records each batch's
loss, and suggests a rate. The trainer itself is left exactly as it was: parameters,
optimizer state, model state, step count, RNGs and history.

The loss curve is smoothed by an exponential moving average with bias correction,
``avg_i = smoothing * avg_{i-1} + (1 - smoothing) * loss_i`` and
``smoothed_i = avg_i / (1 - smoothing ** (i + 1))``. The sweep stops early once the
smoothed loss exceeds ``diverge`` times the lowest smoothed loss so far, or is not
finite. The suggested rate is the **steepest descent** point of the smoothed curve
(the most negative slope of the smoothed loss against ``log(lr)``) among the rates
below the one of the lowest smoothed loss, leaving out the first 10% of the steps
(at least 5: the average holds only a few noisy losses there); when that stretch is
too short to have a slope (fewer than 3 points) or does not descend, it is a tenth
of the rate of the lowest smoothed loss.
Both candidates are in the result (``steepest``, ``min_div_10``).

The sweep runs in compiled blocks of steps: each block is one ``lax.scan`` of the
trainer's own training step (the same loss, penalties, dropout and batch statistics
as ``fit``), with the optimizer rebuilt with the sweep's exponential rate as its
learning-rate schedule; only the per-step losses come back to the host between blocks,
to stop at divergence.

References: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks",
WACV 2017 (arXiv:1506.01186), section 3.3.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._sharding import to_host
from jadam.train.loop import Programs, TrainState

BLOCK = 25  # steps per compiled call: divergence is checked between calls
MIN_STEPS = 5
SKIP_MIN = 5  # first steps never suggested (besides 10% of those run)


@dataclass
class LRFinderResult:
    """The range test's curve and suggestion.

    Attributes:
      lrs: the learning rate of each step run (increasing).
      losses: each step's batch loss (before that step's update).
      smoothed: the bias-corrected moving average of ``losses``.
      suggestion: the suggested learning rate (``steepest``, or ``min_div_10`` when
        there is no descending stretch to measure).
      steepest: the rate of the smoothed curve's steepest descent (None if undefined).
      min_div_10: a tenth of the rate of the lowest smoothed loss.
      diverged: whether the sweep stopped early because the loss diverged.
      rule: how ``suggestion`` was chosen (``"steepest"`` or ``"min/10"``).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    steepest: float | None
    min_div_10: float
    diverged: bool
    rule: str

    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG of the loss against the learning rate (log scale), with the
        suggestion marked. matplotlib is imported here, not with jadam."""
        import matplotlib

        matplotlib.use("Agg", force=True)  # no display needed; never opens a window
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        ax.axvline(self.suggestion, color="C3", linestyle="--",
                   label=f"suggestion {self.suggestion:.2g} ({self.rule})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        finite = self.smoothed[np.isfinite(self.smoothed)]
        if finite.size:  # keep the diverging tail from flattening the interesting part
            lo, hi = float(finite.min()), float(finite[0])
            ax.set_ylim(lo - 0.1 * abs(hi - lo + 1e-12), max(hi, lo) + 0.5 * abs(hi - lo + 1e-12))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)

    def __repr__(self) -> str:
        return (
            f"LRFinderResult(suggestion={self.suggestion:.3g}, rule={self.rule!r}, "
            f"steps={len(self.lrs)}, diverged={self.diverged})"
        )


def _positive(name: str, v: Any) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float | np.floating)
        or not (math.isfinite(v) and v > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def check_options(start, end, steps, smoothing, diverge) -> tuple[float, float, int, float, float]:
    start, end = _positive("start", start), _positive("end", end)
    if end <= start:
        raise ValueError(f"end ({end}) must be larger than start ({start})")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < MIN_STEPS:
        raise ValueError(f"steps must be an integer >= {MIN_STEPS}, got {steps!r}")
    if (
        isinstance(smoothing, bool) or not isinstance(smoothing, int | float | np.floating)
        or not 0 <= smoothing < 1
    ):  # fmt: skip
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    diverge = _positive("diverge", diverge)
    if diverge <= 1:
        raise ValueError(f"diverge must be > 1 (a multiple of the best loss), got {diverge}")
    return start, end, int(steps), float(smoothing), diverge


def sweep_schedule(start: float, end: float, steps: int) -> Callable[[Any], jax.Array]:
    """``lr(i) = start * (end / start) ** (i / (steps - 1))``: ``start`` at step 0,
    ``end`` at step ``steps - 1``."""
    log_ratio = math.log(end / start) / (steps - 1)

    def schedule(count):
        return start * jnp.exp(log_ratio * jnp.asarray(count, jnp.float32))

    return schedule


def smooth(losses: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average of ``losses``."""
    out = np.empty(len(losses), np.float64)
    avg = 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(v)
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float | None, float, str]:
    """``(suggestion, steepest, min_div_10, rule)`` for a finite smoothed curve."""
    ok = np.isfinite(smoothed)
    i_min = int(np.argmin(np.where(ok, smoothed, np.inf)))
    min_div_10 = float(lrs[i_min]) / 10
    steepest = None
    # The first points are skipped: the average holds only a few noisy losses there.
    skip = max(SKIP_MIN, len(lrs) // 10)
    if i_min - skip >= 2 and ok[: i_min + 1].all():
        window = slice(skip, i_min + 1)
        slope = np.gradient(smoothed[window], np.log(lrs[window]))
        if slope.min() < 0:  # else nothing descends: no steepest point to speak of
            steepest = float(lrs[skip + int(np.argmin(slope))])
    if steepest is None:
        return min_div_10, None, min_div_10, "min/10"
    return steepest, steepest, min_div_10, "steepest"


def run_sweep(
    trainer, x, y, n: int, *, tx: optax.GradientTransformation, schedule, steps: int,
    batch_size: int, smoothing: float, diverge: float, seed: int, accumulation: int = 1,
) -> LRFinderResult:  # fmt: skip
    """The sweep on a copy of ``trainer``'s state (see the module docstring)."""
    programs = Programs(
        trainer.adapter, tx, trainer.loss, [], trainer.l1, trainer.l2,
        mesh=trainer.mesh, zero1=trainer.zero1,
    )  # fmt: skip
    # Fresh copies: the trainer's own buffers are never donated or written.
    state0 = trainer.state
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    params, model_state = copy((state0.params, state0.model_state))
    rng = copy(state0.rng)
    state = TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32), rng,
                       model_state)  # fmt: skip

    def block(state, x, y, idx):
        # One training step per scanned row: the same step `fit` compiles, so each
        # step's loss comes back on its own.
        def body(state, rows):
            state, flat = programs._train_chunk(state, x, y, rows[None], None)
            return state, flat

        return jax.lax.scan(body, state, idx)

    block = jax.jit(block, donate_argnums=(0,))
    xd, yd = programs.replicate((x, y))
    # Rows: a fresh permutation per pass over the data, from a generator of the
    # sweep's own (the trainer's shuffling RNG is not advanced).
    order_rng = np.random.default_rng([seed, 0x4C52])
    n_blocks = -(-steps // BLOCK)
    total = n_blocks * BLOCK
    passes = -(-total * batch_size // n)
    rows = np.concatenate([order_rng.permutation(n) for _ in range(passes)])
    rows = rows[: total * batch_size].astype(np.int32)
    idx = rows.reshape(n_blocks, BLOCK, batch_size)

    losses: list[float] = []
    best, avg, diverged = math.inf, 0.0, False
    for b in range(n_blocks):
        state, flats = block(state, xd, yd, programs.place_indices(idx[b]))
        flats = to_host(flats)  # host sync point: once per block
        for flat in flats:
            if len(losses) == steps:
                break
            loss = programs.results(programs.unflatten(flat))["loss"]
            losses.append(loss)
            i = len(losses)
            avg = smoothing * avg + (1 - smoothing) * loss
            sm = avg / (1 - smoothing**i)
            if not math.isfinite(sm) or (i > 1 and sm > diverge * best):
                diverged = True
                break
            best = min(best, sm)
        if diverged or len(losses) == steps:
            break
    del state  # the sweep's copy; the trainer's state was never touched

    # The rate of each batch: the schedule at its update count (one per `accumulation`).
    counts = np.arange(len(losses)) // accumulation
    lrs = np.asarray(to_host(jax.vmap(schedule)(jnp.asarray(counts))), np.float64)
    losses_a = np.asarray(losses, np.float64)
    smoothed = smooth(losses_a, smoothing)
    # The diverging point is plotted but not a candidate for the suggestion.
    cut = len(losses) - 1 if diverged else len(losses)
    if cut < 2:
        raise ValueError(
            f"the loss diverged after {len(losses)} step(s) of the range test: start "
            f"({float(lrs[0]):.3g}) is already too large; try a smaller start"
        )
    suggestion, steepest, min_div_10, rule = suggest(lrs[:cut], smoothed[:cut])
    return LRFinderResult(
        lrs=lrs, losses=losses_a, smoothed=smoothed, suggestion=suggestion, steepest=steepest,
        min_div_10=min_div_10, diverged=diverged, rule=rule,
    )  # fmt: skip
