"""Small numerical helpers shared by the transforms.

Everything here is a pure function of its inputs. The comments say *why* a
helper exists: most of them guard against a precision trap that one of the
anchors (optax, PyTorch, Keras) falls into.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Scalar = Any  # a Python number, or a (possibly traced) 0-d jax array

CONVENTIONS = ("optax", "pytorch", "keras")


def is_none(x: Any) -> bool:
    """`is_leaf` for tree maps in which `None` leaves pass through."""
    return x is None


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype moment arithmetic runs in: float32 or wider, never bf16/f16.

    A bfloat16 `b2 = 0.999` rounds to 1.0, so a second moment updated in bf16
    never decays (optax with bf16 params, Keras' Adam on bf16 variables).
    Chosen by width rather than `promote_types`, which strict dtype promotion
    forbids between float types.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def concrete_float(x: Any) -> float | None:
    """`x` as a Python float when it is known at trace time, else None.

    Hyperparameters are concrete when the user passes numbers, and traced
    arrays under `optax.inject_hyperparams` inside `jit`.
    """
    if callable(x):
        return None
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def decay_terms(decay: Scalar, dtype: Any) -> tuple[Any, Any]:
    """(`decay`, `1 - decay`) ready to multiply arrays of `dtype`.

    For a Python number both are computed in double precision and stay weakly
    typed, so `1 - 0.999` is 0.001 to the last bit of `dtype` instead of
    `1 - float32(0.999)`, which is off by 1.3e-5 relative.
    """
    value = concrete_float(decay)
    if value is not None:
        return value, 1.0 - value
    decay = jnp.asarray(decay).astype(dtype)
    return decay, 1 - decay


def one_minus_power(decay: Scalar, count: jax.Array, dtype: Any) -> jax.Array:
    """`1 - decay**count` in `dtype` (float32 or wider), accurate for decay near 1.

    Written as `-expm1(count * log(decay))` with `log(decay)` taken in double
    precision when `decay` is a Python number: `1 - float32(0.999)**1` carries
    a 1.3e-5 relative error, this carries one rounding.
    """
    count = count.astype(dtype)
    value = concrete_float(decay)
    if value is not None:
        if value == 0.0:
            return jnp.ones_like(count)
        log_decay = math.log(value)
    else:
        log_decay = jnp.log(jnp.asarray(decay).astype(dtype))
    return -jnp.expm1(count * log_decay)


def power(decay: Scalar, count: jax.Array, dtype: Any) -> jax.Array:
    """`decay**count` in `dtype`, with the same care as `one_minus_power`."""
    return 1 - one_minus_power(decay, count, dtype)


def safe_increment(count: jax.Array) -> jax.Array:
    """`count + 1`, saturating at the dtype's maximum instead of wrapping.

    An int32 step counter that wraps to -2**31 would turn bias corrections into
    garbage after 2**31 steps; saturation keeps them at their limit of 1.
    """
    limit = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
    return jnp.where(count < limit, count + 1, limit)


def tree_widest_float(tree: Any) -> jnp.dtype:
    """The widest compute dtype over the leaves of `tree` (float32 if none)."""
    dtypes = [compute_dtype(jnp.asarray(leaf).dtype) for leaf in jax.tree.leaves(tree)]
    return max(dtypes, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))


def flatten_like(updates: Any, moments: Any) -> tuple[Any, list[Any]]:
    """(treedef of `updates`, the per-leaf pieces of `moments`), or a readable error.

    `moments` must have the gradient tree's structure, where each stored moment
    may itself be a small pytree (codes and scales of a quantized storage).
    """
    treedef = jax.tree.structure(updates, is_leaf=is_none)
    try:
        return treedef, treedef.flatten_up_to(moments)
    except (ValueError, TypeError) as err:
        state_def = jax.tree.structure(moments, is_leaf=is_none)
        raise ValueError(
            "The gradient tree does not match the optimizer state: update() received "
            f"gradients of structure\n  {treedef}\nbut the state was built by init() for\n"
            f"  {state_def}\nCall init() on parameters shaped like the gradients you pass "
            "to update()."
        ) from err


# --- hyperparameter validation (at build time, never as NaNs later) -------------


def check_convention(convention: Any) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    return convention


def check_number(name: str, value: Any) -> float | None:
    """`value` as a float; None for a schedule or a traced value (checked later, if
    at all); a ValueError naming `name` for anything else (a string, None, a bool,
    a complex number, an array with more than one entry), which would otherwise
    fail deep inside `update` or, for a bool, silently act as 0 or 1."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        kind = np.dtype(value.dtype).kind  # NumPy and JAX scalars and arrays
    except (AttributeError, TypeError):
        kind = ""
    if isinstance(value, (bool, np.bool_)) or kind == "b":
        raise ValueError(f"{name} must be a number, not a bool, got {value!r}.")
    if isinstance(value, complex) or kind == "c":
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not isinstance(value, (str, bytes)) and np.ndim(value) == 0:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} must be a number, got {value!r}.")


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> None:
    """`0 <= value < inf` (`<= inf` with `allow_inf`) when it is concrete; schedules
    and traced values pass. An infinite step size or penalty turns parameters into
    NaNs on the first step, so only arguments whose limit means something (and say
    so in their docstring) take `allow_inf`."""
    number = check_number(name, value)
    if number is None:
        return
    if allow_inf and not number >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"{name} must be >= 0 (inf allowed), got {number!r}.")
    if not allow_inf and not 0 <= number < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}.")


def check_decay(name: str, value: Any) -> None:
    """A moment decay rate must lie in [0, 1)."""
    number = check_number(name, value)
    if number is not None and not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {number!r}.")


def check_finite(name: str, value: Any) -> None:
    number = check_number(name, value)
    if number is not None and not np.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}.")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int in [low, high] (None: unbounded); ints and NumPy
    integers, not bools (`True` as a block size or seed is a typo, not 1)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        bounds = f" in [{low}, {high}]"
    elif low is not None:
        bounds = f" >= {low}"
    else:
        bounds = ""
    raise ValueError(f"{name} must be an int{bounds}, got {value!r}.")


def check_flag(name: str, value: Any) -> bool:
    """`value` must be a bool (a string such as "no" would otherwise read as True)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def map_moments(fn: Any, updates: Any, keys: Any, *moment_trees: Any) -> tuple[Any, ...]:
    """Apply `fn(g, key, *moments) -> (direction, *new_moments)` leaf by leaf.

    Returns `(direction tree, *new moment trees)`, one tree per moment tree.
    The gradient tree gives the structure (see `flatten_like`); `keys` is the
    tree of rounding words from `leaf_keys`. A `None` gradient leaf gives `None`
    in every output, and a tree without array leaves (an empty dict, the
    subtree of an unused `optax.multi_transform` label, an all-masked
    `optax.masked`) gives trees of its own structure without calling `fn`.
    """
    treedef = jax.tree.structure(updates, is_leaf=is_none)
    grads = treedef.flatten_up_to(updates)
    columns = [flatten_like(updates, tree)[1] for tree in (keys, *moment_trees)]
    results = [None if g is None else fn(g, *row) for g, *row in zip(grads, *columns, strict=True)]
    # With no array leaf `fn` never runs: then the direction and one tree per moment.
    width = next((len(r) for r in results if r is not None), 1 + len(moment_trees))
    outputs = [[None if r is None else r[i] for r in results] for i in range(width)]
    return tuple(treedef.unflatten(column) for column in outputs)
