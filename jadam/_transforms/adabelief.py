"""AdaBelief: Adam with the variance of the gradient around its prediction.

Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
Gradients", NeurIPS 2020, arXiv:2010.07468.
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


class ScaleByBeliefState(NamedTuple):
    """State of `scale_by_adabelief`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # first moment m, one stored moment per parameter leaf
    nu: Any  # belief s: EMA of (g - m)^2, eps_root added at every step


def scale_by_adabelief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by AdaBelief's bias-corrected belief in the gradient.

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t \\
        s_t = b_2 s_{t-1} + (1 - b_2) (g_t - m_t)^2 + \epsilon_{root} \\
        \hat m_t = m_t / (1 - b_1^t), \qquad \hat s_t = s_t / (1 - b_2^t) \\
        u_t = \hat m_t / (\sqrt{\hat s_t} + \epsilon)

    With ``nesterov=True``,
    :math:`\hat m_t = b_1 m_t / (1 - b_1^{t+1}) + (1 - b_1) g_t / (1 - b_1^t)`.

    Warning: :math:`\epsilon_{root}` is added to the *stored* :math:`s_t` at every
    step (Algorithm 2 of the paper, and `optax.scale_by_belief`), so it accumulates
    to :math:`\epsilon_{root} / (1 - b_2)` in the state; it is not Adam's eps_root.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the belief, in [0, 1).
      eps: added to the denominator, >= 0.
      eps_root: added to the belief at every step, >= 0.
      nesterov: use Nesterov momentum (as `optax.scale_by_belief`).
      mu_dtype, nu_dtype: storage of each moment (a float dtype, "q8",
        `jadam.Quantized`, `jadam.StochasticRounding`); None stores in the
        parameter's compute dtype.

    Example:
      >>> import jax.numpy as jnp, jadam
      >>> tx = jadam.scale_by_adabelief()
      >>> state = tx.init({"w": jnp.ones(2)})
      >>> direction, state = tx.update({"w": jnp.array([1.0, -1.0])}, state)
      >>> [round(float(x), 3) for x in direction["w"]]  # g / 0.9 on the first step
      [1.111, -1.111]
    """
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def leaf_update(g, mu, nu, *, count, key):
        dtype = nx.compute_dtype(g.dtype)
        g32 = g.astype(dtype)
        b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
        b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
        m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
        s = b2_ * nu_store.read(nu, dtype) + one_minus_b2 * jnp.square(g32 - m) + eps_root
        bc1 = nx.one_minus_power(b1, count, dtype)
        if nesterov:
            bc1_next = nx.one_minus_power(b1, nx.safe_increment(count), dtype)
            m_hat = b1_ * m / bc1_next + one_minus_b1 * g32 / bc1
        else:
            m_hat = m / bc1
        s_hat = s / nx.one_minus_power(b2, count, dtype)
        direction = m_hat / (jnp.sqrt(s_hat) + eps)
        return direction.astype(g.dtype), mu_store.write(m, mu, key), nu_store.write(s, nu, key)

    return moment_transform(leaf_update, mu_store, nu_store, state=ScaleByBeliefState)


def adabelief(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdaBelief (Zhuang et al., arXiv:2010.07468); `scale_by_adabelief` has the formulas.

    Matches `optax.adabelief` (which has no weight decay: leave `weight_decay=0`).
    `weight_decay` is decoupled, `-lr * (u + wd * p)`, the paper's `weight_decouple`.

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, eps, eps_root, nesterov, mu_dtype, nu_dtype: as in `scale_by_adabelief`.
      weight_decay: decoupled decay rate, >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    return with_learning_rate(
        scale_by_adabelief(
            b1, b2, eps, eps_root, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype
        ),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )
