"""AdEMAMix: Adam with a mixture of a fast and a slow momentum.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv:2409.03137.
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
    value_at,
    with_learning_rate,
    zeros_state,
)


class ScaleByAdemamixState(NamedTuple):
    """State of `scale_by_ademamix`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # m1: fast EMA of the gradients (decay b1), bias-corrected when used
    mu_slow: Any  # m2: slow EMA of the gradients (decay b3), never bias-corrected
    nu: Any  # second moment (decay b2)


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by AdEMAMix's mixture of two momenta.

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        m^{slow}_t = b_3 m^{slow}_{t-1} + (1 - b_3) g_t \\
        v_t = b_2 v_{t-1} + (1 - b_2) g_t^2 \\
        u_t = \frac{m_t / (1 - b_1^t) + \alpha\, m^{slow}_t}
                   {\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

    `b3` and `alpha` may be schedules of the 0-based step, which is how the paper
    warms them up (its Algorithm 1 with :math:`T_{\alpha, b_3}`).

    Warning: `optax.contrib.scale_by_ademamix` defaults `alpha` to 6.0 and its
    alias `optax.contrib.ademamix` to 5.0 (the paper's value); jadam uses 5.0 for
    both. optax also stores the second moment in `mu_dtype`; jadam in `nu_dtype`.

    Args:
      b1: decay of the fast EMA, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the slow EMA, in [0, 1), or a schedule.
      alpha: weight of the slow EMA, >= 0, or a schedule.
      eps: added to the denominator, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of both EMAs; nu_dtype: of the second moment (as in
        `jadam.scale_by_adam`).
    """
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_decay("b3", b3)
    nx.check_nonnegative("alpha", alpha)
    nx.check_finite("alpha", alpha)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        return ScaleByAdemamixState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_state(mu_store, params),
            mu_slow=zeros_state(mu_store, params),
            nu=zeros_state(nu_store, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state.count)

        def leaf(g, key, mu, mu_slow, nu):
            dtype = nx.compute_dtype(g.dtype)
            g32 = g.astype(dtype)
            b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
            b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
            if callable(b3):
                b3_ = value_at(b3, state.count, dtype)
                one_minus_b3 = 1 - b3_
            else:
                b3_, one_minus_b3 = nx.decay_terms(b3, dtype)
            a = value_at(alpha, state.count, dtype) if callable(alpha) else alpha
            m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
            m_slow = b3_ * mu_store.read(mu_slow, dtype) + one_minus_b3 * g32
            v = b2_ * nu_store.read(nu, dtype) + one_minus_b2 * jnp.square(g32)
            m_hat = m / nx.one_minus_power(b1, count, dtype)
            v_hat = v / nx.one_minus_power(b2, count, dtype)
            direction = (m_hat + a * m_slow) / (jnp.sqrt(v_hat + eps_root) + eps)
            return (
                direction.astype(g.dtype),
                mu_store.write(m, mu, key),
                mu_store.write(m_slow, mu_slow, fold_key(key, 1)),
                nu_store.write(v, nu, key),
            )

        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, mu_slow, nu = nx.map_moments(
            leaf, updates, keys, state.mu, state.mu_slow, state.nu
        )
        return direction, ScaleByAdemamixState(count, mu, mu_slow, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ademamix(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix (Pagliardini et al., arXiv:2409.03137); `scale_by_ademamix` has the formulas.

    Matches `optax.contrib.ademamix`: `-lr * (u + weight_decay * p)`.

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype: as in `scale_by_ademamix`.
      weight_decay: decoupled decay rate, >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    return with_learning_rate(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )
