"""RAdam: Adam with a rectified adaptive learning rate, the `scale_by_radam` block.

Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", arXiv:1908.03265.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import resolve_storage
from jadam._transforms.adam import (
    adam_denominator,
    check_moment_args,
    moment_transform,
    update_moments,
)


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    threshold: float = 5.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by RAdam's rectified moment estimates.

    With :math:`\rho_\infty = 2 / (1 - b_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t b_2^t / (1 - b_2^t)`:

    .. math::
        r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                         {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
        u_t = r_t\, \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
        \ \text{ if } \rho_t \text{ passes the threshold, else } \hat m_t

    Conventions:

    - ``"optax"``: rectify where :math:`\rho_t \ge` `threshold`; epsilon after
      the bias correction.
    - ``"pytorch"``: rectify where :math:`\rho_t >` `threshold` (torch fixes it
      at 5); epsilon added to :math:`\sqrt{v_t}` before the bias correction.
    - ``"keras"``: Keras has no RAdam; building one raises `ValueError`.

    Args:
      b1, b2, eps, eps_root, mu_dtype, nu_dtype, convention: as in `scale_by_adam`.
      threshold: the :math:`\rho_t` below which the step is plain momentum.
    """
    check_moment_args(b1, b2, eps, eps_root, convention)
    if convention == "keras":
        raise ValueError(
            "convention='keras' has no RAdam (keras.optimizers has none to match); "
            "use convention='optax' or 'pytorch'."
        )
    nx.check_finite("threshold", threshold)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def leaf_update(g, mu, nu, *, count, key):
        dtype = nx.compute_dtype(g.dtype)
        g32 = g.astype(dtype)
        m, v = update_moments(
            g32, mu_store.read(mu, dtype), nu_store.read(nu, dtype), b1=b1, b2=b2, dtype=dtype
        )
        bc1 = nx.one_minus_power(b1, count, dtype)
        bc2 = nx.one_minus_power(b2, count, dtype)
        _, one_minus_b2 = nx.decay_terms(b2, dtype)
        rho_inf = 2 / one_minus_b2 - 1
        t = count.astype(dtype)
        rho = rho_inf - 2 * t * (1 - bc2) / bc2
        # Clamped so that the unused branch of `where` is never NaN: a NaN
        # there would still poison gradients taken through the update.
        ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        rect = jnp.sqrt(jnp.maximum(ratio, 0))
        m_hat = m / bc1
        denom = adam_denominator(
            v / bc2,
            bc2,
            eps=eps,
            eps_root=eps_root,
            eps_on_raw_moment=convention == "pytorch",
        )
        passes = rho > threshold if convention == "pytorch" else rho >= threshold
        direction = jnp.where(passes, rect * m_hat / denom, m_hat)
        return direction.astype(g.dtype), mu_store.write(m, mu, key), nu_store.write(v, nu, key)

    return moment_transform(leaf_update, mu_store, nu_store)
