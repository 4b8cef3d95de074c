"""Yogi: Adam with an additive, sign-controlled second-moment update.

Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018
(https://papers.nips.cc/paper/8186-adaptive-methods-for-nonconvex-optimization).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import resolve_storage
from jadam._transforms._common import ScalarOrSchedule, with_learning_rate
from jadam._transforms.adam import moment_transform


class ScaleByYogiState(NamedTuple):
    """State of `scale_by_yogi`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # first moment, starts at initial_accumulator_value
    nu: Any  # second moment, starts at initial_accumulator_value


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    *,
    initial_accumulator_value: float = 1e-6,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Yogi's bias-corrected moment estimates.

    With :math:`m_0 = v_0 = ` `initial_accumulator_value`:

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t \\
        v_t = v_{t-1} - (1 - b_2)\, \mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2 \\
        u_t = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

    Warning: as in `optax.scale_by_yogi`, *both* moments start at
    `initial_accumulator_value` and are then bias-corrected as if they had
    started at zero (the bias correction does not remove that start). jadam
    follows optax.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: rate of the second moment's additive update, in [0, 1).
      eps: added to the denominator, >= 0 (Yogi's default 1e-3 is large on purpose).
      eps_root: added inside the square root, >= 0.
      initial_accumulator_value: start of both moments, >= 0.
      mu_dtype, nu_dtype: storage of each moment, as in `jadam.scale_by_adam`.
    """
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    nx.check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    nx.check_finite("initial_accumulator_value", initial_accumulator_value)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def start(store, p):
        value = jnp.full(jnp.shape(p), initial_accumulator_value, nx.compute_dtype(p.dtype))
        return store.write(value, store.init(p))

    def leaf_update(g, mu, nu, *, count, key):
        dtype = nx.compute_dtype(g.dtype)
        g32 = g.astype(dtype)
        b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
        _, one_minus_b2 = nx.decay_terms(b2, dtype)
        m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
        v_prev = nu_store.read(nu, dtype)
        g2 = jnp.square(g32)
        v = v_prev - one_minus_b2 * jnp.sign(v_prev - g2) * g2
        m_hat = m / nx.one_minus_power(b1, count, dtype)
        v_hat = v / nx.one_minus_power(b2, count, dtype)
        direction = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
        return direction.astype(g.dtype), mu_store.write(m, mu, key), nu_store.write(v, nu, key)

    return moment_transform(
        leaf_update, mu_store, nu_store, state=ScaleByYogiState, init_moment=start
    )


def yogi(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    *,
    initial_accumulator_value: float = 1e-6,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Yogi (Zaheer et al., NeurIPS 2018); `scale_by_yogi` has the formulas.

    Matches `optax.yogi` (which has no weight decay).

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, eps, initial_accumulator_value, mu_dtype, nu_dtype: as in `scale_by_yogi`.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    return with_learning_rate(
        scale_by_yogi(
            b1,
            b2,
            eps,
            initial_accumulator_value=initial_accumulator_value,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        learning_rate,
        maximize=maximize,
    )
