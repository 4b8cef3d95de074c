"""Helpers shared by the families in `jadam._transforms`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx

ScalarOrSchedule = Any  # a float, or an optax schedule `step -> float`


def is_python_zero(x: Any) -> bool:
    # Decided by type, not value, so that optax.inject_hyperparams (which passes
    # arrays to both init and update) always builds the same chain.
    return isinstance(x, (int, float)) and x == 0


def check_alias_args(learning_rate: Any, weight_decay: Any = 0.0) -> None:
    nx.check_nonnegative("learning_rate", learning_rate)
    nx.check_nonnegative("weight_decay", weight_decay)


def negate_gradients() -> optax.GradientTransformationExtraArgs:
    """`g -> -g`, stateless: gradient ascent."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return jax.tree.map(jnp.negative, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ascent_steps(maximize: Any) -> list[optax.GradientTransformation]:
    """The chain's first steps for `maximize` (torch's): the gradient negated before
    everything else, coupled L2 included; none when False, so the state is unchanged."""
    return [negate_gradients()] if nx.check_flag("maximize", maximize) else []


def with_learning_rate(
    direction: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    *,
    l2: Any = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """`chain(-g?, coupled L2?, direction, decoupled decay?, -learning_rate)`: the optax layout."""
    check_alias_args(learning_rate, weight_decay)
    nx.check_nonnegative("l2", l2)
    steps = ascent_steps(maximize)
    if not is_python_zero(l2):
        # Coupled L2, torch.optim.Adam(weight_decay=l2): g + l2 * p enters the moments.
        steps.append(optax.add_decayed_weights(l2))
    steps.append(direction)
    if not is_python_zero(weight_decay):
        # Decoupled (Loshchilov & Hutter): -lr * (direction + wd * p).
        steps.append(optax.add_decayed_weights(weight_decay, mask))
    steps.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*steps)


def value_at(value: ScalarOrSchedule, step: jax.Array, dtype: Any) -> jax.Array:
    """A constant or `schedule(step)` as a 0-d array of `dtype`."""
    if callable(value):
        value = value(step)
    return jnp.asarray(value).astype(dtype)


def safe_norm(x: jax.Array) -> jax.Array:
    """The Euclidean norm of `x`, with a zero (not NaN) derivative at `x = 0`."""
    squares = jnp.sum(jnp.square(x))
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1)), 0)


def require_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(f"{name}.update needs the parameters: call update(grads, state, params).")


def zeros_state(store: Any, params: Any) -> Any:
    return jax.tree.map(store.init, params)


def mask_leaves(mask: Any, params: Any, updates: Any) -> list[Any]:
    """One flag per leaf of `updates` (True: decayed) from an optax-style `mask`.

    `mask` is None (every leaf), a pytree of booleans that is a prefix of the
    parameters, or a function of the parameters returning one.
    """
    treedef = jax.tree.structure(updates, is_leaf=nx.is_none)
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    full = jax.tree.broadcast(tree, updates, is_leaf=nx.is_none)
    return treedef.flatten_up_to(full)
