"""ADOPT: Adam with the current gradient left out of its own normalisation.

Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate", NeurIPS 2024, arXiv:2411.02853.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import leaf_keys, resolve_storage
from jadam._transforms._common import ScalarOrSchedule, with_learning_rate, zeros_state


class ScaleByAdoptState(NamedTuple):
    """State of `scale_by_adopt`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # first moment of the normalised gradients
    nu: Any  # second moment; g_1^2 after the first step


def _quarter_power(step):
    return step**0.25


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _quarter_power,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by ADOPT's normalise-then-average rule.

    The first step only sets :math:`v_1 = g_1^2` (its direction is zero). For
    :math:`t \ge 2`, with :math:`c_t` = `clip_value_fn(t - 1)` (the paper's
    :math:`(t-1)^{1/4}`):

    .. math::
        \tilde g_t = \mathrm{clip}\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon),\ -c_t, c_t\big) \\
        m_t = b_1 m_{t-1} + (1 - b_1) \tilde g_t, \qquad u_t = m_t \\
        v_t = b_2 v_{t-1} + (1 - b_2) g_t^2

    The second moment is updated *after* it normalised :math:`g_t`, so the step
    does not depend on the current gradient's own magnitude; there are no bias
    corrections. With ``nesterov=True``, :math:`u_t = b_1 m_t + (1 - b_1) \tilde g_t`
    (as `optax.contrib.scale_by_adopt`). ``use_clipping=False`` is the paper's
    Algorithm 1 without the clip.

    This is `optax.contrib.scale_by_adopt` and the paper's clipped algorithm (which
    agree). Note: optax's docstring cites arXiv:2403.00855 for it; the ADOPT paper
    is arXiv:2411.02853.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: lower bound of the normaliser, >= 0.
      nesterov: Nesterov momentum, as above.
      use_clipping: clip the normalised gradient to :math:`[-c_t, c_t]`.
      clip_value_fn: :math:`c` as a function of the number of previous steps
        (a float array: 1, 2, ...), or a number >= 0 for a constant clip.
      mu_dtype, nu_dtype: storage of each moment, as in `jadam.scale_by_adam`.
    """
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    if not callable(clip_value_fn):
        # A number is a constant clip; optax.inject_hyperparams passes the function's
        # value at the current step this way.
        nx.check_nonnegative("clip_value_fn", clip_value_fn)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        return ScaleByAdoptState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_state(mu_store, params),
            nu=zeros_state(nu_store, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state.count)
        first = state.count == 0

        def leaf(g, key, mu, nu):
            dtype = nx.compute_dtype(g.dtype)
            g32 = g.astype(dtype)
            b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
            b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
            m_prev = mu_store.read(mu, dtype)
            v_prev = nu_store.read(nu, dtype)
            # v is zero before the first step: keep that branch finite (and its derivative).
            safe_v = jnp.where(first, 1, v_prev)
            normalised = g32 / jnp.maximum(jnp.sqrt(safe_v), eps)
            if use_clipping:
                clip = clip_value_fn
                if callable(clip):
                    clip = clip(state.count.astype(dtype))
                clip = jnp.asarray(clip).astype(dtype)
                normalised = jnp.clip(normalised, -clip, clip)
            # The first step stores g^2 and leaves m (and the parameters) alone.
            normalised = jnp.where(first, 0, normalised)
            m = b1_ * m_prev + one_minus_b1 * normalised
            m = jnp.where(first, m_prev, m)
            v = jnp.where(first, jnp.square(g32), b2_ * v_prev + one_minus_b2 * jnp.square(g32))
            direction = b1_ * m + one_minus_b1 * normalised if nesterov else m
            return direction.astype(g.dtype), mu_store.write(m, mu, key), nu_store.write(v, nu, key)

        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, nu = nx.map_moments(leaf, updates, keys, state.mu, state.nu)
        return direction, ScaleByAdoptState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adopt(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = _quarter_power,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """ADOPT (Taniguchi et al., arXiv:2411.02853); `scale_by_adopt` has the formulas.

    Matches `optax.contrib.adopt` (which has no weight decay).

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, eps, nesterov, use_clipping, clip_value_fn, mu_dtype, nu_dtype: as in
        `scale_by_adopt`.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    return with_learning_rate(
        scale_by_adopt(
            b1,
            b2,
            eps,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        learning_rate,
        maximize=maximize,
    )
