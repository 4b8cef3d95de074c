"""Models: the MLP, composing sub-models, and one adapter over Linen and NNX.

The trainer sees every model through :class:`ModelAdapter`: ``init(key, x)`` gives
``(params, rest)`` and ``apply(params, rest, x)`` gives outputs, whether the user
wrote a Linen module or an NNX one. Inputs may be one array, a tuple of arrays
(passed as positional arguments: ``model(a, b)``) or a dict of arrays (passed as
keyword arguments: ``model(a=..., b=...)``).

Only jadam's own modules (:class:`MLP`, :class:`Combine`) can be rebuilt from a
saved JSON config; for anything else, pass the model to ``Trainer.load``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "selu": nn.selu,
    "silu": nn.silu,
    "swish": nn.swish,
    "leaky_relu": nn.leaky_relu,
    "softplus": nn.softplus,
    "linear": lambda x: x,
}


class MLP(nn.Module):
    """Dense layers; hidden layers use ``activation``, the last one returns logits.

    ``MLP(features=(32, 1))`` is the classic Keras ``Dense(32, relu) -> Dense(1)``
    (the sigmoid lives in the loss, which is numerically stable from logits).
    Inputs with more than one feature axis (e.g. 8x8 images) are flattened.
    """

    features: Sequence[int]
    activation: str = "relu"

    def setup(self):
        if not self.features:
            raise ValueError("MLP needs at least one layer size in `features`")
        if any(int(f) < 1 for f in self.features):
            raise ValueError(f"MLP layer sizes must be >= 1, got {tuple(self.features)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}"
            )
        self.layers = [nn.Dense(int(f), name=f"Dense_{i}") for i, f in enumerate(self.features)]

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)

    def get_config(self) -> dict:
        return {
            "kind": "MLP",
            "features": [int(f) for f in self.features],
            "activation": self.activation,
        }


class Combine(nn.Module):
    """Several sub-networks, one per input, concatenated and fed to a head.

    ``Combine(branches=(MLP((16,)), MLP((16,))), head=MLP((8, 1)))`` takes two
    inputs (``trainer.fit((x_a, x_b), y)``).
    """

    branches: Sequence[nn.Module]
    head: nn.Module

    def __call__(self, *inputs):
        if len(inputs) != len(self.branches):
            raise ValueError(f"Combine has {len(self.branches)} branches, got {len(inputs)} inputs")
        h = [b(x) for b, x in zip(self.branches, inputs, strict=True)]
        return self.head(jnp.concatenate(h, axis=-1))

    def get_config(self) -> dict:
        return {
            "kind": "Combine",
            "branches": [model_config(b) for b in self.branches],
            "head": model_config(self.head),
        }


def model_config(model: Any) -> dict | None:
    """JSON-able config that rebuilds ``model``, or None for a user's own module."""
    get = getattr(model, "get_config", None)
    if isinstance(model, MLP | Combine) and get is not None:
        return get()
    return None


MAX_CONFIG_DEPTH = 16  # nesting of Combine configs read from a file
MAX_LAYERS = 1024
MAX_UNITS = 2**31 - 1


def model_from_config(cfg: Any, _depth: int = 0) -> nn.Module:
    """Rebuild a jadam model from plain JSON data (no code is imported or executed).

    Raises ValueError naming the field for a config that is malformed or out of bounds.
    """
    if _depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"model configs are nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"not a model config: {str(cfg)[:80]!r}")
    kind = cfg["kind"]
    if kind == "MLP":
        features, activation = cfg.get("features"), cfg.get("activation")
        if (
            not isinstance(features, list) or not 1 <= len(features) <= MAX_LAYERS
            or not all(type(f) is int and 1 <= f <= MAX_UNITS for f in features)
        ):  # fmt: skip
            raise ValueError(
                f"MLP features must be a list of layer sizes >= 1, got {str(features)[:80]}"
            )
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown MLP activation {str(activation)[:40]!r}; known: {sorted(ACTIVATIONS)}"
            )
        return MLP(features=tuple(features), activation=activation)
    if kind == "Combine":
        branches = cfg.get("branches")
        if not isinstance(branches, list) or not 1 <= len(branches) <= MAX_LAYERS:
            raise ValueError("Combine branches must be a non-empty list of model configs")
        return Combine(
            branches=tuple(model_from_config(b, _depth + 1) for b in branches),
            head=model_from_config(cfg.get("head"), _depth + 1),
        )
    raise ValueError(f"unknown model kind {str(kind)[:40]!r} in config")


def call_model(fn, x):
    """Call ``fn`` the way jadam passes inputs: array, tuple -> *args, dict -> **kwargs."""
    if isinstance(x, dict):
        return fn(**x)
    if isinstance(x, tuple | list):
        return fn(*x)
    return fn(x)


class ModelAdapter:
    """One functional view of a Linen or an NNX model."""

    def __init__(self, model: Any):
        if isinstance(model, nnx.Module):
            self.kind = "nnx"
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            self._graphdef = graphdef
            self._nnx_params = params
            self._nnx_rest = rest
        elif isinstance(model, nn.Module):
            self.kind = "linen"
        else:
            raise TypeError(
                f"model must be a flax.linen.Module or flax.nnx.Module, got {type(model).__name__}"
            )
        self.model = model
        self.config = model_config(model)

    def init(self, key: jax.Array, x: Any) -> tuple[Any, Any]:
        """Parameters and the other (non-trained) variables."""
        if self.kind == "nnx":
            return self._nnx_params, self._nnx_rest
        variables = call_model(lambda *a, **k: self.model.init(key, *a, **k), x)
        variables = dict(variables)
        params = variables.pop("params", {})
        return params, variables

    def apply(self, params: Any, rest: Any, x: Any) -> jax.Array:
        if self.kind == "nnx":
            module = nnx.merge(self._graphdef, params, rest)
            return call_model(module, x)
        variables = {"params": params, **rest}
        return call_model(lambda *a, **k: self.model.apply(variables, *a, **k), x)

    def tabulate(self, key: jax.Array, x: Any) -> str:
        # Plain text (no ANSI colour codes): the table is returned and may go to a file.
        console = {"width": 110, "force_terminal": False, "no_color": True, "color_system": None}
        if self.kind == "nnx":
            return call_model(
                lambda *a, **k: nnx.tabulate(self.model, *a, console_kwargs=console, **k), x
            )
        return call_model(
            lambda *a, **k: self.model.tabulate(key, *a, console_kwargs=console, **k), x
        )

    def merged(self, params: Any, rest: Any) -> Any:
        """The user's NNX model with trained parameters (a new object), or the Linen module."""
        if self.kind == "nnx":
            return nnx.merge(self._graphdef, params, rest)
        return self.model
