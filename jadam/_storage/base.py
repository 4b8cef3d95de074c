"""How a moment is stored between steps.

The transforms do their arithmetic in float32 or wider (see `_numerics`) and
only *store* moments in the dtype a user asks for. A storage object owns that
boundary with three pure methods:

- `init(param)`: the zero moment for one parameter leaf;
- `read(stored, dtype)`: the moment as an array of the compute dtype;
- `write(value, stored, key=None)`: the new moment, in the same layout and
  dtype as `stored`, so that state dtypes never drift across steps. `key` is a
  random uint32 word for storages that round stochastically (`needs_key`);
  the transforms get one per (step, leaf index) from `leaf_keys`, and the
  storage mixes in its own seed and stream.

Storages: `FloatStorage` (a dtype), `StochasticRounding` (bf16/f16, unbiased
rounding, `rounding`) and `Quantized` (blockwise 8-bit codes, `quantized`).

A stored moment may itself be a small pytree (a quantized storage keeps codes
and scales): the transforms walk the state with the gradient tree as the
structure, so one parameter's moment is whatever subtree sits at its place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jadam._numerics import compute_dtype, is_none
from jadam._storage.quantized import Quantized
from jadam._storage.rounding import StochasticRounding, leaf_words, mix


@dataclasses.dataclass(frozen=True)
class FloatStorage:
    """A moment stored as a plain array.

    `dtype=None` stores in the parameter's compute dtype: float32 for bf16,
    f16 and f32 parameters, float64 for float64 ones. That default is what
    makes bf16 training correct without asking.
    """

    dtype: jnp.dtype | None = None

    def init(self, param: jax.Array) -> jax.Array:
        dtype = self.dtype if self.dtype is not None else compute_dtype(param.dtype)
        return jnp.zeros(jnp.shape(param), dtype)

    def read(self, stored: jax.Array, dtype: Any) -> jax.Array:
        return stored.astype(dtype)

    needs_key = False

    def write(self, value: jax.Array, stored: jax.Array, key: Any = None) -> jax.Array:
        del key
        return value.astype(stored.dtype)


Storage = Any  # FloatStorage | StochasticRounding | Quantized: init / read / write


def resolve_storage(name: str, spec: Any) -> Storage:
    """Turn a user's `mu_dtype` / `nu_dtype` argument into a storage object.

    Accepts None, a floating dtype, `"q8"`, a `Quantized` or a
    `StochasticRounding`. The second moment (`nu_dtype`) is non-negative and
    draws its own random stream: the returned storage knows which it stores.
    Raises `ValueError` naming `name` for anything else.
    """
    second = name != "mu_dtype"
    if spec is None:
        return FloatStorage(None)
    if isinstance(spec, FloatStorage):
        return spec
    if isinstance(spec, str) and spec == "q8":
        spec = Quantized()
    if isinstance(spec, Quantized):
        return dataclasses.replace(spec, signed=not second, stream=int(second))
    if isinstance(spec, StochasticRounding):
        return dataclasses.replace(spec, stream=int(second))
    try:
        dtype = jnp.dtype(spec)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be None, a floating dtype such as jnp.float32 or 'bfloat16', "
            f"'q8', jadam.Quantized(...) or jadam.StochasticRounding(...), got {spec!r}."
        )
    return FloatStorage(dtype)


def leaf_keys(updates: Any, count: jax.Array, *stores: Storage) -> Any:
    """A tree shaped like `updates` with one random uint32 word per leaf, or `None`s.

    The word of leaf `i` at step `count` is a pure function of both (the
    storage mixes in its seed), so stochastic rounding is reproducible. One
    threefry call draws the words of all leaves. When no storage rounds
    stochastically every entry is `None` and nothing is traced.
    """
    treedef = jax.tree.structure(updates, is_leaf=is_none)
    leaves = treedef.flatten_up_to(updates)
    if not any(store.needs_key for store in stores):
        return treedef.unflatten([None] * len(leaves))
    words = leaf_words(0, 0, count, max(len(leaves), 1))
    return treedef.unflatten([None if g is None else words[i] for i, g in enumerate(leaves)])


def fold_key(key: Any, salt: int) -> Any:
    """A different word for a second moment stored at the same leaf (AMSGrad's max)."""
    return None if key is None else mix(key, salt)
