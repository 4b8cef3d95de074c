"""How a moment is stored between steps.

The transforms do their arithmetic in float32 or wider (see `_numerics`) and
only *store* moments in the dtype a user asks for. A storage object owns that
boundary with three pure methods:

- `init(param)`: the zero moment for one parameter leaf;
- `read(stored, dtype)`: the moment as an array of the compute dtype;
- `write(value, stored)`: the new moment, in the same layout and dtype as
  `stored`, so that state dtypes never drift across steps.

A stored moment may itself be a small pytree (a quantized storage keeps codes
and scales): the transforms walk the state with the gradient tree as the
structure, so one parameter's moment is whatever subtree sits at its place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jadam._numerics import compute_dtype


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

    def write(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return value.astype(stored.dtype)


def resolve_storage(name: str, spec: Any) -> FloatStorage:
    """Turn a user's `mu_dtype` / `nu_dtype` argument into a storage object.

    Raises `ValueError` naming `name` for anything that is not a floating dtype.
    """
    if spec is None:
        return FloatStorage(None)
    if isinstance(spec, FloatStorage):
        return spec
    try:
        dtype = jnp.dtype(spec)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be None or a floating dtype such as jnp.float32 or "
            f"'bfloat16', got {spec!r}."
        )
    return FloatStorage(dtype)
