"""Adan: adaptive Nesterov momentum from gradient differences.

Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", arXiv:2208.06677.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import fold_key, leaf_keys, resolve_storage
from jadam._transforms._common import (
    ScalarOrSchedule,
    ascent_steps,
    check_alias_args,
    is_python_zero,
    mask_leaves,
    require_params,
    value_at,
    with_learning_rate,
    zeros_state,
)


class ScaleByAdanState(NamedTuple):
    """State of `scale_by_adan`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # m: EMA of the gradients (mu_dtype)
    delta: Any  # v: EMA of the gradient differences g_t - g_{t-1} (mu_dtype)
    nu: Any  # n: EMA of (g_t + b2 (g_t - g_{t-1}))^2 (nu_dtype)
    prev_grad: Any  # g_{t-1}, in the gradient's dtype (zeros before the first step)


def scale_by_adan(
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Adan's moment estimates.

    With the gradient difference :math:`\Delta_t = g_t - g_{t-1}` (:math:`\Delta_1 = 0`):

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        v_t = b_2 v_{t-1} + (1 - b_2) \Delta_t \\
        n_t = b_3 n_{t-1} + (1 - b_3) (g_t + (1 - b_2) \Delta_t)^2 \\
        u_t = \frac{\hat m_t + (1 - b_2) \hat v_t}{\sqrt{\hat n_t + \epsilon_{root}} + \epsilon}

    where each hat divides by :math:`1 - b^t` of its own rate. The rates are
    optax's, one minus the paper's :math:`\beta_1, \beta_2, \beta_3`
    (paper: 0.02, 0.08, 0.01).

    Args:
      b1: decay of the gradient average, in [0, 1).
      b2: decay of the gradient-difference average, in [0, 1).
      b3: decay of the second moment, in [0, 1).
      eps: added to the denominator, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of m and v; nu_dtype: storage of n (as in `jadam.scale_by_adam`).
        The previous gradient is kept exactly, in the gradient's dtype.
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        nx.check_decay(name, value)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        return ScaleByAdanState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_state(mu_store, params),
            delta=zeros_state(mu_store, params),
            nu=zeros_state(nu_store, params),
            prev_grad=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state.count)

        def leaf(g, key, mu, delta, nu, prev):
            dtype = nx.compute_dtype(g.dtype)
            g32 = g.astype(dtype)
            diff = jnp.where(count > 1, g32 - prev.astype(dtype), 0)
            b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
            b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
            b3_, one_minus_b3 = nx.decay_terms(b3, dtype)
            m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
            v = b2_ * mu_store.read(delta, dtype) + one_minus_b2 * diff
            n = b3_ * nu_store.read(nu, dtype) + one_minus_b3 * jnp.square(
                g32 + one_minus_b2 * diff
            )
            m_hat = m / nx.one_minus_power(b1, count, dtype)
            v_hat = v / nx.one_minus_power(b2, count, dtype)
            n_hat = n / nx.one_minus_power(b3, count, dtype)
            direction = (m_hat + one_minus_b2 * v_hat) / (jnp.sqrt(n_hat + eps_root) + eps)
            return (
                direction.astype(g.dtype),
                mu_store.write(m, mu, key),
                mu_store.write(v, delta, fold_key(key, 1)),
                nu_store.write(n, nu, key),
                g.astype(prev.dtype),
            )

        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, delta, nu, prev = nx.map_moments(
            leaf, updates, keys, state.mu, state.delta, state.nu, state.prev_grad
        )
        return direction, ScaleByAdanState(count, mu, delta, nu, prev)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ProximalDecayState(NamedTuple):
    """State of Adan's proximal weight decay."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, the schedules' argument


def _proximal_decay(learning_rate, weight_decay, mask):
    """`p <- (p + step) / (1 + lr wd)` as an update, after `scale_by_learning_rate`."""

    def init_fn(params):
        del params
        return ProximalDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "adan(proximal=True)")
        treedef = jax.tree.structure(updates, is_leaf=nx.is_none)
        flags = mask_leaves(mask, params, updates)
        out = []
        for u, p, flag in zip(
            treedef.flatten_up_to(updates), treedef.flatten_up_to(params), flags, strict=True
        ):
            if u is None:
                out.append(None)
                continue
            dtype = nx.compute_dtype(u.dtype)
            shrink = value_at(learning_rate, state.count, dtype) * value_at(
                weight_decay, state.count, dtype
            )
            shrink = shrink * jnp.asarray(flag, dtype)
            p32 = p.astype(dtype)
            new = (p32 + u.astype(dtype)) / (1 + shrink)
            out.append((new - p32).astype(u.dtype))
        return treedef.unflatten(out), ProximalDecayState(nx.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adan(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    proximal: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adan (Xie et al., arXiv:2208.06677); `scale_by_adan` has the formulas.

    Matches `optax.adan`, whose weight decay is decoupled:
    :math:`p_{t} = p_{t-1} - \eta (u_t + \lambda p_{t-1})`.

    Warning: the paper's Algorithm 1 (and the authors' default, `no_prox=False`)
    decays proximally instead, :math:`p_t = (p_{t-1} - \eta u_t) / (1 + \eta\lambda)`;
    pass `proximal=True` for that. The two agree when `weight_decay=0`.

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, b3, eps, eps_root, mu_dtype, nu_dtype: as in `scale_by_adan`
        (optax's alias adds eps_root = 1e-8, its block 0).
      weight_decay: decay rate, >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      proximal: decay as the paper does (above) instead of optax's way.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    direction = scale_by_adan(b1, b2, b3, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    if not proximal:
        return with_learning_rate(
            direction, learning_rate, weight_decay=weight_decay, mask=mask, maximize=maximize
        )
    check_alias_args(learning_rate, weight_decay)
    steps = [*ascent_steps(maximize), direction, optax.scale_by_learning_rate(learning_rate)]
    if not is_python_zero(weight_decay):
        steps.append(_proximal_decay(learning_rate, weight_decay, mask))
    return optax.chain(*steps)
