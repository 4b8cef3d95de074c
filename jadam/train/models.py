"""Models: the MLP, composing sub-models, and one adapter over Linen and NNX.

The trainer sees every model through :class:`ModelAdapter`: ``init(key, x)`` gives
``(params, rest)`` and ``apply(params, rest, x)`` gives outputs, whether the user
wrote a Linen module or an NNX one. Inputs may be one array, a tuple of arrays
(passed as positional arguments: ``model(a, b)``) or a dict of arrays (passed as
keyword arguments: ``model(a=..., b=...)``).

Training and inference mode. ``apply_train`` runs the model as ``fit`` does:
dropout on (a fresh key per step, from the ``"dropout"`` RNG stream for Linen; an
NNX ``nnx.Dropout`` draws from the ``nnx.Rngs`` it was built with, whose count is
part of the model state) and batch statistics from the batch, updating the running
averages. ``apply`` is inference mode (``evaluate``, ``predict``, ``export``):
deterministic, running averages. A Linen module is switched by a keyword argument
of its ``__call__`` named ``train`` or ``training`` (True in ``fit``) or
``deterministic`` (False in ``fit``), passed on every call (also to ``init``, in
inference mode); one without such an argument runs the same way in both. An NNX
module is switched with ``nnx.view`` (``deterministic=`` and
``use_running_average=`` on every submodule that has them); the model object passed
in is not modified.

The model state is every variable that is not a trainable parameter: Linen's
collections other than ``"params"`` (``batch_stats``, ...), which ``apply_train``
treats as mutable, and NNX's non-``nnx.Param`` variables (``BatchStat``, RNG keys
and counts). The trainer keeps it in its train state, so it is checkpointed, and a
resumed run draws the same dropout masks. A model without such variables trains
exactly as before: no mutable collections, no extra work.

Only jadam's own modules (:class:`MLP`, :class:`Combine`) can be rebuilt from a
saved JSON config; for anything else, pass the model to ``Trainer.load``.
"""

from __future__ import annotations

import inspect
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

    ``batch_norm=True`` puts a batch normalization between each hidden layer and its
    activation (Keras' ``BatchNormalization`` defaults: momentum 0.99, epsilon 1e-3);
    ``dropout=r`` drops hidden activations with rate ``r`` after the activation
    (scaled by ``1 / (1 - r)`` in training, as Keras does). Both act in training
    (``train=True``, as ``fit`` calls it) and are off or use the running averages
    otherwise. The last layer has neither.
    """

    features: Sequence[int]
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    def setup(self):
        if not self.features:
            raise ValueError("MLP needs at least one layer size in `features`")
        if any(int(f) < 1 for f in self.features):
            raise ValueError(f"MLP layer sizes must be >= 1, got {tuple(self.features)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}"
            )
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ValueError(f"MLP dropout must be a rate in [0, 1), got {rate!r}")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"MLP batch_norm must be True or False, got {self.batch_norm!r}")
        self.layers = [nn.Dense(int(f), name=f"Dense_{i}") for i, f in enumerate(self.features)]
        hidden = range(len(self.features) - 1)
        if self.batch_norm:
            self.norms = [
                nn.BatchNorm(momentum=0.99, epsilon=1e-3, name=f"BatchNorm_{i}") for i in hidden
            ]
        if rate:
            self.drop = nn.Dropout(float(rate))

    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            if self.batch_norm:
                x = self.norms[i](x, use_running_average=not train)
            x = act(x)
            if self.dropout:
                x = self.drop(x, deterministic=not train)
        return self.layers[-1](x)

    def get_config(self) -> dict:
        cfg = {
            "kind": "MLP",
            "features": [int(f) for f in self.features],
            "activation": self.activation,
        }
        if self.dropout:
            cfg["dropout"] = float(self.dropout)
        if self.batch_norm:
            cfg["batch_norm"] = True
        return cfg


class Combine(nn.Module):
    """Several sub-networks, one per input, concatenated and fed to a head.

    ``Combine(branches=(MLP((16,)), MLP((16,))), head=MLP((8, 1)))`` takes two
    inputs (``trainer.fit((x_a, x_b), y)``).
    """

    branches: Sequence[nn.Module]
    head: nn.Module

    def __call__(self, *inputs, train: bool = False):
        if len(inputs) != len(self.branches):
            raise ValueError(f"Combine has {len(self.branches)} branches, got {len(inputs)} inputs")
        h = [_call_linen(b, (x,), train) for b, x in zip(self.branches, inputs, strict=True)]
        return _call_linen(self.head, (jnp.concatenate(h, axis=-1),), train)

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
        dropout, batch_norm = cfg.get("dropout", 0.0), cfg.get("batch_norm", False)
        if type(dropout) not in (int, float) or not 0 <= dropout < 1:
            raise ValueError(f"MLP dropout must be a rate in [0, 1), got {str(dropout)[:40]}")
        if type(batch_norm) is not bool:
            raise ValueError(f"MLP batch_norm must be true or false, got {str(batch_norm)[:40]}")
        return MLP(
            features=tuple(features), activation=activation, dropout=float(dropout),
            batch_norm=batch_norm,
        )  # fmt: skip
    if kind == "Combine":
        branches = cfg.get("branches")
        if not isinstance(branches, list) or not 1 <= len(branches) <= MAX_LAYERS:
            raise ValueError("Combine branches must be a non-empty list of model configs")
        return Combine(
            branches=tuple(model_from_config(b, _depth + 1) for b in branches),
            head=model_from_config(cfg.get("head"), _depth + 1),
        )
    raise ValueError(f"unknown model kind {str(kind)[:40]!r} in config")


def call_model(fn, x, **kw):
    """Call ``fn`` the way jadam passes inputs: array, tuple -> *args, dict -> **kwargs."""
    if isinstance(x, dict):
        return fn(**x, **kw)
    if isinstance(x, tuple | list):
        return fn(*x, **kw)
    return fn(x, **kw)


TRAIN_FLAGS = ("train", "training", "deterministic")


def train_flag(module: Any) -> str | None:
    """The keyword of a Linen module's ``__call__`` that switches training mode, or None."""
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return None
    for name in TRAIN_FLAGS:
        p = params.get(name)
        if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return name
    return None


def _flag_kwargs(flag: str | None, train: bool) -> dict:
    if flag is None:
        return {}
    return {flag: (not train) if flag == "deterministic" else train}


def _call_linen(module: nn.Module, args: tuple, train: bool) -> Any:
    return module(*args, **_flag_kwargs(train_flag(module), train))


def _is_key(a: Any) -> bool:
    return isinstance(a, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
        a.dtype, jax.dtypes.prng_key
    )


class ModelAdapter:
    """One functional view of a Linen or an NNX model (see the module docstring).

    ``init(key, x) -> (params, state)``; ``apply(params, state, x)`` in inference
    mode; ``apply_train(params, state, x, key) -> (outputs, new_state)`` in training
    mode. NNX RNG keys in the state are held as raw key data (``uint32``), so the
    state checkpoints like any array tree. ``needs_rng``: ``apply_train`` uses ``key``.
    """

    def __init__(self, model: Any):
        if isinstance(model, nnx.Module):
            self.kind = "nnx"
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            modes = {"raise_if_not_found": False}
            self._graphdef = graphdef
            self._graph_train = nnx.split(
                nnx.view(model, deterministic=False, use_running_average=False, **modes)
            )[0]
            self._graph_eval = nnx.split(
                nnx.view(model, deterministic=True, use_running_average=True, **modes)
            )[0]
            self._nnx_params = params
            self._key_impls = [
                jax.random.key_impl(a) if _is_key(a) else None for a in jax.tree.leaves(rest)
            ]
            self._nnx_rest = self._encode(rest)
            self.flag = None
            self.needs_rng = False  # NNX draws from the Rngs inside the model state
        elif isinstance(model, nn.Module):
            self.kind = "linen"
            self.flag = train_flag(model)
            # jadam's MLP without dropout draws nothing: no key is made for it.
            self.needs_rng = self.flag is not None and not (
                isinstance(model, MLP) and not model.dropout
            )
        else:
            raise TypeError(
                f"model must be a flax.linen.Module or flax.nnx.Module, got {type(model).__name__}"
            )
        self.model = model
        self.config = model_config(model)

    # NNX keys <-> raw key data
    def _encode(self, rest: Any) -> Any:
        return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, rest)

    def _decode(self, rest: Any) -> Any:
        if not any(self._key_impls):
            return rest
        leaves, treedef = jax.tree.flatten(rest)
        leaves = [
            a if impl is None else jax.random.wrap_key_data(a, impl=impl)
            for a, impl in zip(leaves, self._key_impls, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves)

    def init(self, key: jax.Array, x: Any) -> tuple[Any, Any]:
        """Parameters and the model state (the other variables), in inference mode."""
        if self.kind == "nnx":
            return self._nnx_params, self._nnx_rest
        flags = _flag_kwargs(self.flag, False)
        variables = call_model(lambda *a, **k: self.model.init(key, *a, **k), x, **flags)
        variables = dict(variables)
        params = variables.pop("params", {})
        return params, variables

    def apply(self, params: Any, rest: Any, x: Any) -> jax.Array:
        """Outputs in inference mode (deterministic, running averages)."""
        if self.kind == "nnx":
            module = nnx.merge(self._graph_eval, params, self._decode(rest))
            return call_model(module, x)
        variables = {"params": params, **rest}
        flags = _flag_kwargs(self.flag, False)
        return call_model(lambda *a, **k: self.model.apply(variables, *a, **k), x, **flags)

    def apply_train(self, params: Any, rest: Any, x: Any, key: jax.Array | None) -> tuple:
        """Outputs in training mode and the updated model state."""
        if self.kind == "nnx":
            if not jax.tree.leaves(rest):  # nothing to update: the plain call
                return call_model(nnx.merge(self._graph_train, params, rest), x), rest
            module = nnx.merge(self._graph_train, params, self._decode(rest))
            out = call_model(module, x)
            return out, self._encode(nnx.split(module, nnx.Param, ...)[2])
        variables = {"params": params, **rest}
        kw = _flag_kwargs(self.flag, True)
        if key is not None:
            kw["rngs"] = {"dropout": key}
        if rest:
            kw["mutable"] = list(rest)
            fn = lambda *a, **k: self.model.apply(variables, *a, **k)  # noqa: E731
            out, new = call_model(fn, x, **kw)
            return out, {**rest, **new}
        return call_model(lambda *a, **k: self.model.apply(variables, *a, **k), x, **kw), rest

    def tabulate(self, key: jax.Array, x: Any) -> str:
        # Plain text (no ANSI colour codes): the table is returned and may go to a file.
        console = {"width": 110, "force_terminal": False, "no_color": True, "color_system": None}
        if self.kind == "nnx":
            return call_model(
                lambda *a, **k: nnx.tabulate(self.model, *a, console_kwargs=console, **k), x
            )
        flags = _flag_kwargs(self.flag, False)
        return call_model(
            lambda *a, **k: self.model.tabulate(key, *a, console_kwargs=console, **k), x, **flags
        )

    def merged(self, params: Any, rest: Any) -> Any:
        """The user's NNX model with trained parameters (a new object), or the Linen module."""
        if self.kind == "nnx":
            return nnx.merge(self._graphdef, params, self._decode(rest))
        return self.model
