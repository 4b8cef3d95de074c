"""LAMB: Adam with a layer-wise trust ratio.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", ICLR 2020, arXiv:1904.00962.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._storage import leaf_keys, resolve_storage
from jadam._transforms._common import (
    ScalarOrSchedule,
    ascent_steps,
    check_alias_args,
    mask_leaves,
    require_params,
    safe_norm,
    value_at,
    zeros_state,
)


class ScaleByLambState(NamedTuple):
    """State of `scale_by_lamb`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # first moment, one stored moment per parameter leaf
    nu: Any  # second moment


def _trust_ratio(numerator, denominator):
    """`numerator / denominator`, and 1 where either norm is zero (optax and Keras)."""
    ok = (numerator > 0) & (denominator > 0)
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 1)


def scale_by_lamb(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    learning_rate: ScalarOrSchedule | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    r"""LAMB's direction: the Adam step, decayed and rescaled leaf by leaf.

    With the Adam direction
    :math:`a_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)` (as in
    `jadam.scale_by_adam`), weight decay :math:`\lambda` (masked leaves: 0),
    learning rate :math:`\eta` and the norm :math:`\|\cdot\|` over one leaf:

    - ``"optax"`` (`optax.lamb`, the paper's Algorithm 2):

      .. math::
          d_t = a_t + \lambda p, \qquad
          u_t = \frac{\|p\|}{\|d_t\|}\, d_t

    - ``"keras"`` (`keras.optimizers.Lamb`): Keras first shrinks the variable by
      :math:`1 - \eta\lambda` and then rescales the undecayed Adam step by the
      shrunk norm:

      .. math::
          u_t = \lambda p + \frac{(1 - \eta\lambda)\, \|p\|}{\|a_t\|}\, a_t

    The ratio is 1 where either norm is zero, in both. The output is the direction;
    `jadam.lamb` scales it by `-learning_rate`. With `weight_decay=0` the two
    conventions are the same formula.

    Warning: under ``"keras"`` the decay lies outside the trust ratio (Keras'
    base optimizer applies it before `Lamb.update_step`), which is not the
    paper's LAMB; jadam follows Keras there. That form needs the learning rate:
    pass `learning_rate` (the alias does).

    Args:
      b1, b2, eps, eps_root: as in `jadam.scale_by_adam` (optax's LAMB default eps: 1e-6).
      weight_decay: decoupled decay rate, >= 0, or a schedule of the step.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      learning_rate: the step size, needed by ``"keras"`` with a weight decay.
      mu_dtype, nu_dtype: storage of each moment, as in `jadam.scale_by_adam`.
      convention: ``"optax"`` or ``"keras"`` (``"pytorch"``: torch has no LAMB).
    """
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    nx.check_nonnegative("weight_decay", weight_decay)
    nx.check_convention(convention)
    if convention == "pytorch":
        raise ValueError(
            "convention='pytorch' has no LAMB (torch.optim has none to match); "
            "use convention='optax' or 'keras'."
        )
    keras_decay = convention == "keras" and not (
        isinstance(weight_decay, (int, float)) and weight_decay == 0
    )
    if keras_decay and learning_rate is None:
        raise ValueError(
            "learning_rate is needed by scale_by_lamb(convention='keras') with a "
            "weight_decay: Keras measures the norm of the decayed parameters."
        )
    if learning_rate is not None:
        nx.check_nonnegative("learning_rate", learning_rate)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        return ScaleByLambState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros_state(mu_store, params),
            nu=zeros_state(nu_store, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "scale_by_lamb")
        count = nx.safe_increment(state.count)
        treedef = jax.tree.structure(updates, is_leaf=nx.is_none)
        params_leaves = treedef.flatten_up_to(params)
        flags = mask_leaves(mask, params, updates)
        # (parameter, decayed?) per leaf, walked alongside the moments.
        decayed = treedef.unflatten(list(zip(params_leaves, flags, strict=True)))

        def leaf(g, key, mu, nu, p_and_flag):
            p, flag = p_and_flag
            dtype = nx.compute_dtype(g.dtype)
            g32, p32 = g.astype(dtype), p.astype(dtype)
            b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
            b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
            m = b1_ * mu_store.read(mu, dtype) + one_minus_b1 * g32
            v = b2_ * nu_store.read(nu, dtype) + one_minus_b2 * jnp.square(g32)
            m_hat = m / nx.one_minus_power(b1, count, dtype)
            v_hat = v / nx.one_minus_power(b2, count, dtype)
            a = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
            wd = value_at(weight_decay, count - 1, dtype) * jnp.asarray(flag, dtype)
            if convention == "keras":
                shrink = 1 - value_at(learning_rate, count - 1, dtype) * wd if keras_decay else 1
                ratio = _trust_ratio(safe_norm(p32 * shrink), safe_norm(a))
                direction = wd * p32 + ratio * a
            else:
                d = a + wd * p32
                direction = _trust_ratio(safe_norm(p32), safe_norm(d)) * d
            stored = (mu_store.write(m, mu, key), nu_store.write(v, nu, key))
            return (direction.astype(g.dtype), *stored, None)

        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, nu, _ = nx.map_moments(leaf, updates, keys, state.mu, state.nu, decayed)
        return direction, ScaleByLambState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lamb(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """LAMB (You et al., arXiv:1904.00962); `scale_by_lamb` has the formulas.

    Matches `optax.lamb` and, under ``convention="keras"``, `keras.optimizers.Lamb`
    (whose default `epsilon` is 1e-7: pass `eps=1e-7` to reproduce a Keras run).

    Warning: Keras decays the weights outside the trust ratio; optax (and the paper)
    inside it. The two agree when `weight_decay=0`.

    Args:
      learning_rate: step size, >= 0, or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, nu_dtype, convention: as in `scale_by_lamb`.
      weight_decay: decoupled decay rate, >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else.
    """
    check_alias_args(learning_rate, weight_decay)
    return optax.chain(
        *ascent_steps(maximize),
        scale_by_lamb(
            b1,
            b2,
            eps,
            eps_root,
            weight_decay=weight_decay,
            mask=mask,
            learning_rate=learning_rate,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
