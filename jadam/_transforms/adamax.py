"""Adamax: Adam with the infinity norm, the `scale_by_adamax` block.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980, section 7.1.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import resolve_storage
from jadam._transforms.adam import check_moment_args, moment_transform


def scale_by_adamax(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Adamax's infinity-norm estimate.

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t \\
        u_t = \max(b_2 u_{t-1}, |g_t| + \epsilon), \qquad
        \text{direction} = \frac{m_t}{(1 - b_1^t)\, u_t}

    Conventions:

    - ``"optax"`` and ``"pytorch"``: epsilon inside the maximum, as above.
    - ``"keras"``: :math:`u_t = \max(b_2 u_{t-1}, |g_t|)` and the direction is
      :math:`m_t / ((1 - b_1^t)(u_t + \epsilon))`.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: >= 0, see the conventions.
      mu_dtype, nu_dtype, convention: as in `scale_by_adam`.
    """
    check_moment_args(b1, b2, eps, 0.0, convention)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def leaf_update(g, mu, nu, *, count, key):
        dtype = nx.compute_dtype(g.dtype)
        g32 = g.astype(dtype)
        b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
        b2_, _ = nx.decay_terms(b2, dtype)
        m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
        decayed = b2_ * nu_store.read(nu, dtype)
        bc1 = nx.one_minus_power(b1, count, dtype)
        if convention == "keras":
            u = jnp.maximum(decayed, jnp.abs(g32))
            direction = m / (bc1 * (u + eps))
        else:
            u = jnp.maximum(decayed, jnp.abs(g32) + eps)
            direction = m / (bc1 * u)
        return direction.astype(g.dtype), mu_store.write(m, mu, key), nu_store.write(u, nu, key)

    return moment_transform(leaf_update, mu_store, nu_store)
