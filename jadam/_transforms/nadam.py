"""NAdam: Adam with a scheduled Nesterov momentum, the `scale_by_nadam` block.

Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import leaf_keys, resolve_storage
from jadam._transforms.adam import adam_denominator, check_moment_args, update_moments

# psi in mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi)) when `momentum_decay=None`.
# None means a constant mu_t = b1 (the limit psi -> infinity), optax's NAdam.
DEFAULT_MOMENTUM_DECAY = {"optax": None, "pytorch": 0.004, "keras": 1.0}
_LOG_096 = math.log(0.96)


class ScaleByNadamState(NamedTuple):
    """State of `scale_by_nadam`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu_product: jax.Array  # shape=(): prod_{i<=t} mu_i, in the widest compute dtype
    mu: Any  # first moment
    nu: Any  # second moment


def momentum_at(b1: Any, step: jax.Array, momentum_decay: Any, dtype: Any) -> jax.Array:
    """mu_t = b1 * (1 - 0.5 * 0.96**(t * momentum_decay)); b1 when momentum_decay is None."""
    b1_, _ = nx.decay_terms(b1, dtype)
    if momentum_decay is None:
        return jnp.full((), b1_, dtype)
    exponent = step.astype(dtype) * momentum_decay
    return b1_ * (1 - 0.5 * jnp.exp(exponent * _LOG_096))


def scale_by_nadam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    momentum_decay: float | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by NAdam's Nesterov-corrected moment estimates.

    With the momentum schedule :math:`\mu_t = b_1 (1 - \tfrac12 0.96^{t \psi})`
    (:math:`\psi` = `momentum_decay`) and :math:`\Pi_t = \prod_{i \le t} \mu_i`:

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        v_t = b_2 v_{t-1} + (1 - b_2) g_t^2 \\
        \hat m_t = \frac{\mu_{t+1} m_t}{1 - \Pi_t \mu_{t+1}}
                 + \frac{(1 - \mu_t) g_t}{1 - \Pi_t}, \qquad
        \hat v_t = \frac{v_t}{1 - b_2^t} \\
        u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

    The frameworks differ only in the schedule, which `momentum_decay=None`
    picks by convention:

    - ``"optax"``: constant :math:`\mu_t = b_1` (:math:`\psi \to \infty`), which
      makes this `optax.nadam` exactly.
    - ``"pytorch"``: :math:`\psi = 0.004`, `torch.optim.NAdam`'s default.
    - ``"keras"``: :math:`\psi = 1`, the fixed :math:`0.96^t` of
      `keras.optimizers.Nadam`, which has no such hyperparameter.

    An explicit `momentum_decay` uses that :math:`\psi` in any convention. All
    three put epsilon after the bias correction.

    Args:
      b1, b2, eps, eps_root, mu_dtype, nu_dtype, convention: as in `scale_by_adam`.
      momentum_decay: :math:`\psi` above, >= 0, or None for the convention's schedule.
        ``inf`` is allowed and means its limit, a constant :math:`\mu_t = b_1`.
    """
    check_moment_args(b1, b2, eps, eps_root, convention)
    if momentum_decay is None:
        momentum_decay = DEFAULT_MOMENTUM_DECAY[convention]
    else:
        nx.check_nonnegative("momentum_decay", momentum_decay, allow_inf=True)
        if nx.concrete_float(momentum_decay) == math.inf:
            momentum_decay = None  # the limit: a constant mu_t = b1, without inf * 0 traps
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        return ScaleByNadamState(
            count=jnp.zeros([], jnp.int32),
            mu_product=jnp.ones([], nx.tree_widest_float(params)),
            mu=jax.tree.map(mu_store.init, params),
            nu=jax.tree.map(nu_store.init, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state.count)
        wide = state.mu_product.dtype
        mu_t = momentum_at(b1, count, momentum_decay, wide)
        mu_next = momentum_at(b1, count + 1, momentum_decay, wide)
        mu_product = state.mu_product * mu_t

        def leaf_update(g, key, mu, nu):
            dtype = nx.compute_dtype(g.dtype)
            g32 = g.astype(dtype)
            m, v = update_moments(
                g32, mu_store.read(mu, dtype), nu_store.read(nu, dtype), b1=b1, b2=b2, dtype=dtype
            )
            now, following, product = (x.astype(dtype) for x in (mu_t, mu_next, mu_product))
            m_hat = following * m / (1 - product * following) + (1 - now) * g32 / (1 - product)
            bc2 = nx.one_minus_power(b2, count, dtype)
            denom = adam_denominator(
                v / bc2, bc2, eps=eps, eps_root=eps_root, eps_on_raw_moment=False
            )
            return (
                (m_hat / denom).astype(g.dtype),
                mu_store.write(m, mu, key),
                nu_store.write(v, nu, key),
            )

        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, nu = nx.map_moments(leaf_update, updates, keys, state.mu, state.nu)
        return direction, ScaleByNadamState(count, mu_product, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
