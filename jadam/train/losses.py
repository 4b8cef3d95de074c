"""Losses and metrics by name, computed from logits.

Every loss here takes the model's raw output (logits for classification) and the
labels, and returns one value per example; the loop turns those into weighted
means so that padded rows (weight 0) never count. Metrics are *accumulators*: a
pytree of weighted sums that add up across batches and calls, and a ``result``
that turns the sums into the number reported. This is what lets a whole epoch run
as one ``lax.scan`` and still report an exact (not batch-averaged) accuracy, and an
AUC computed the way Keras does (a histogram of scores over fixed thresholds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[Array, Array], Array]  # (outputs, labels) -> per-example loss, shape (B,)
    task: str  # "binary" | "categorical" | "sparse" | "regression"
    # how outputs become what `predict` returns: probabilities for classification.
    link: Callable[[Array], Array]


def _per_example(x: Array) -> Array:
    """Sum everything but the batch axis: one number per example."""
    return x.reshape(x.shape[0], -1).sum(axis=1) if x.ndim > 1 else x


def _binary_ce(logits: Array, y: Array) -> Array:
    y = y.reshape(logits.shape).astype(logits.dtype)
    # log(1 + exp(-|z|)) form inside optax: stable for any logit.
    return _per_example(optax.sigmoid_binary_cross_entropy(logits, y)) / max(
        1, int(np.prod(logits.shape[1:]))
    )


def _categorical_ce(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy(logits, y.astype(logits.dtype))


def _sparse_ce(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1).astype(jnp.int32))


def _mse(out: Array, y: Array) -> Array:
    d = out - y.reshape(out.shape).astype(out.dtype)
    return _per_example(d * d) / max(1, int(np.prod(out.shape[1:])))


def _mae(out: Array, y: Array) -> Array:
    d = jnp.abs(out - y.reshape(out.shape).astype(out.dtype))
    return _per_example(d) / max(1, int(np.prod(out.shape[1:])))


LOSSES: dict[str, Loss] = {
    "binary_crossentropy": Loss("binary_crossentropy", _binary_ce, "binary", jax.nn.sigmoid),
    "categorical_crossentropy": Loss(
        "categorical_crossentropy", _categorical_ce, "categorical", jax.nn.softmax
    ),
    "sparse_categorical_crossentropy": Loss(
        "sparse_categorical_crossentropy", _sparse_ce, "sparse", jax.nn.softmax
    ),
    "mse": Loss("mse", _mse, "regression", lambda z: z),
    "mae": Loss("mae", _mae, "regression", lambda z: z),
}
_ALIASES = {"mean_squared_error": "mse", "mean_absolute_error": "mae"}


def get_loss(name: str) -> Loss:
    if not isinstance(name, str):
        raise TypeError(f"loss must be a name (one of {sorted(LOSSES)}), got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[key]


# --------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric as accumulated sums: ``init`` zeros, ``update`` adds a batch, ``result``."""

    name: str
    init: Callable[[], Any]
    update: Callable[[Any, Array, Array, Array], Any]  # (sums, outputs, labels, weights)
    result: Callable[[Any], float]


def _mean_metric(name: str, per_example: Callable[[Array, Array], Array]) -> Metric:
    def init():
        return (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(sums, out, y, w):
        v = per_example(out, y).astype(jnp.float32)
        return (sums[0] + jnp.sum(w * v), sums[1] + jnp.sum(w))

    def result(sums):
        return float(sums[0]) / max(float(sums[1]), 1e-12)

    return Metric(name, init, update, result)


def _accuracy_for(task: str) -> Callable[[Array, Array], Array]:
    if task == "binary":
        return lambda z, y: jnp.mean(
            ((z > 0) == (y.reshape(z.shape) > 0.5)).reshape(z.shape[0], -1), axis=1
        )
    if task == "categorical":
        return lambda z, y: (jnp.argmax(z, -1) == jnp.argmax(y, -1)).astype(jnp.float32)
    if task == "sparse":
        return lambda z, y: (jnp.argmax(z, -1) == y.reshape(-1)).astype(jnp.float32)
    raise ValueError("metric 'accuracy' needs a classification loss, not a regression loss")


_AUC_BINS = 200  # Keras' AUC uses 200 thresholds by default; same approximation here.


def _auc_metric() -> Metric:
    def init():
        return jnp.zeros((2, _AUC_BINS), jnp.float32)  # [negatives, positives] per score bin

    def update(hist, z, y, w):
        p = jax.nn.sigmoid(z.reshape(z.shape[0], -1)[:, 0].astype(jnp.float32))
        b = jnp.clip((p * _AUC_BINS).astype(jnp.int32), 0, _AUC_BINS - 1)
        pos = (y.reshape(y.shape[0], -1)[:, 0] > 0.5).astype(jnp.int32)
        return hist.at[pos, b].add(w)

    def result(hist):
        hist = np.asarray(hist, np.float64)
        neg, pos = hist[0], hist[1]
        if pos.sum() == 0 or neg.sum() == 0:
            return float("nan")
        # Sweep thresholds from high to low: ROC points, trapezoid rule.
        tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / pos.sum()])
        fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
        return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))

    return Metric("auc", init, update, result)


METRIC_NAMES = ("accuracy", "auc", "mse", "mae")


def get_metric(name: str, loss: Loss) -> Metric:
    if name in ("accuracy", "acc"):
        return _mean_metric("accuracy", _accuracy_for(loss.task))
    if name == "auc":
        if loss.task != "binary":
            raise ValueError("metric 'auc' is only defined for binary_crossentropy")
        return _auc_metric()
    if name in ("mse", "mae"):
        return _mean_metric(name, LOSSES[name].fn)
    raise ValueError(f"unknown metric {name!r}; known metrics: {list(METRIC_NAMES)}")


def weight_penalty(params: Any, l1: float, l2: float) -> Array:
    """Keras-style ``l1 * sum|w| + l2 * sum w**2`` over weight matrices (ndim >= 2).

    Biases and scales (1-D leaves) are not penalized, as in Keras where regularizers
    are attached to kernels. This is part of the loss, unlike an optimizer's decoupled
    weight decay.
    """
    total = jnp.zeros((), jnp.float32)
    if not l1 and not l2:
        return total
    for leaf in jax.tree.leaves(params):
        if leaf.ndim >= 2:
            leaf = leaf.astype(jnp.float32)
            if l1:
                total = total + l1 * jnp.sum(jnp.abs(leaf))
            if l2:
                total = total + l2 * jnp.sum(leaf * leaf)
    return total
