"""Adam and AMSGrad: the `scale_by_adam` building block.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
Reddi et al., "On the Convergence of Adam and Beyond" (AMSGrad), arXiv:1904.09237.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx
from jadam._native import dispatch
from jadam._storage import fold_key, leaf_keys, resolve_storage


class ScaleByAdamState(NamedTuple):
    """State of `scale_by_adam`, `scale_by_adamax` and `scale_by_radam`."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    mu: Any  # first moment, one stored moment per parameter leaf
    nu: Any  # second moment (Adamax: exponentially weighted infinity norm)


class ScaleByAmsgradState(NamedTuple):
    """State of `scale_by_adam(amsgrad=True)`."""

    count: jax.Array  # shape=(), dtype=int32
    mu: Any
    nu: Any
    nu_max: Any  # running maximum of the second moment (raw or corrected: see convention)


def init_adam_state(params: Any, mu_store: Any, nu_store: Any) -> ScaleByAdamState:
    """Zero count and zero moments, each stored as its storage says."""
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(mu_store.init, params),
        nu=jax.tree.map(nu_store.init, params),
    )


def moment_transform(
    leaf_update: Any,
    mu_store: Any,
    nu_store: Any,
    *,
    state: Any = ScaleByAdamState,
    init_moment: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The (count, mu, nu) transform around a per-leaf rule.

    `leaf_update(g, mu, nu, *, count, key) -> (direction, new_mu, new_nu)` gets one
    gradient leaf, its stored moments, the incremented step and its rounding key.
    `state` is the (count, mu, nu) NamedTuple the transform keeps; `init_moment(store,
    param)` gives a moment's start (default: the storage's zero).
    """

    def init_fn(params):
        if init_moment is None:
            return state(*init_adam_state(params, mu_store, nu_store))
        return state(
            jnp.zeros([], jnp.int32),
            jax.tree.map(lambda p: init_moment(mu_store, p), params),
            jax.tree.map(lambda p: init_moment(nu_store, p), params),
        )

    def update_fn(updates, state_, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state_.count)
        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, mu, nu = nx.map_moments(
            lambda g, key, mu, nu: leaf_update(g, mu, nu, count=count, key=key),
            updates,
            keys,
            state_.mu,
            state_.nu,
        )
        return direction, state(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_moment_args(b1: Any, b2: Any, eps: Any, eps_root: Any, convention: str) -> None:
    """Validate the hyperparameters every Adam-family transform shares."""
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    nx.check_nonnegative("eps_root", eps_root)
    nx.check_convention(convention)


def update_moments(g, mu, nu, *, b1, b2, dtype):
    """The two exponential moving averages, in the compute dtype."""
    b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
    b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
    m = b1_ * mu + one_minus_b1 * g
    v = b2_ * nu + one_minus_b2 * (g * g)
    return m, v


def effective_eps(eps, bc2, *, eps_on_raw_moment):
    """Epsilon as added after the bias correction, wherever the convention puts it.

    Keras' Adam (and PyTorch's RAdam) add epsilon to the square root of the
    *raw* second moment (`eps_on_raw_moment`), which equals adding
    `eps / sqrt(1 - b2**t)` after the bias correction: a larger epsilon early on.
    """
    return eps / jnp.sqrt(bc2) if eps_on_raw_moment else eps


def adam_denominator(v_hat, bc2, *, eps, eps_root, eps_on_raw_moment):
    """`sqrt(v_hat + eps_root) + eps`, with epsilon where the convention puts it."""
    return jnp.sqrt(v_hat + eps_root) + effective_eps(eps, bc2, eps_on_raw_moment=eps_on_raw_moment)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    amsgrad: bool = False,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Adam's bias-corrected moment estimates.

    With gradient :math:`g_t` and step :math:`t = 1, 2, \dots`:

    .. math::
        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        v_t = b_2 v_{t-1} + (1 - b_2) g_t^2 \\
        \hat m_t = m_t / (1 - b_1^t), \qquad \hat v_t = v_t / (1 - b_2^t) \\
        u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

    The output is the *direction* :math:`u_t`; aliases scale it by `-learning_rate`.

    Conventions (formulas only; defaults never change):

    - ``"optax"`` and ``"pytorch"``: epsilon added after bias correction, as above.
    - ``"keras"``: epsilon added to :math:`\sqrt{v_t}` before bias correction
      (Keras' "epsilon hat"), i.e. :math:`\epsilon / \sqrt{1 - b_2^t}` above.
    - AMSGrad: optax keeps the running maximum of :math:`\hat v_t`; PyTorch and
      Keras keep the maximum of the raw :math:`v_t` and bias-correct it after.
    - ``nesterov=True``: Dozat's Nesterov momentum with constant :math:`b_1`,
      :math:`\hat m_t = b_1 m_t / (1 - b_1^{t+1}) + (1 - b_1) g_t / (1 - b_1^t)`
      (what `optax.nadam` does); `scale_by_nadam` has the scheduled form.

    Moment arithmetic runs in float32 or wider whatever the storage dtype, and
    the bias corrections :math:`1 - b^t` are computed to one rounding, so bf16
    parameters with `b2 = 0.999` train correctly.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, >= 0.
      eps_root: added inside the square root, >= 0 (use > 0 to differentiate
        through the update at zero gradients).
      amsgrad: keep the running maximum of the second moment (Reddi et al.).
      nesterov: use Nesterov momentum (see above).
      mu_dtype, nu_dtype: storage dtype of each moment; None stores in the
        parameter's compute dtype (float32 for bf16/f16/f32 parameters).
      convention: ``"optax"``, ``"pytorch"`` or ``"keras"``.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, jadam
      >>> tx = jadam.scale_by_adam()
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> direction, state = tx.update({"w": jnp.array([1.0, -2.0, 0.0])}, state)
      >>> direction["w"].round(3)
      Array([ 1., -1.,  0.], dtype=float32)
    """
    check_moment_args(b1, b2, eps, eps_root, convention)
    amsgrad, nesterov = nx.check_flag("amsgrad", amsgrad), nx.check_flag("nesterov", nesterov)
    mu_store = resolve_storage("mu_dtype", mu_dtype)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        state = init_adam_state(params, mu_store, nu_store)
        if amsgrad:
            return ScaleByAmsgradState(*state, jax.tree.map(nu_store.init, params))
        return state

    def leaf_update(g, mu, nu, *nu_max, count, key=None):
        # A native CPU kernel where one computes this step (both moments in 8 bits, or
        # both in bf16 rounded stochastically), else `jax_leaf_update`.
        return dispatch.adam_leaf(
            jax_leaf_update, g, mu, nu, *nu_max, count=count, key=key, mu_store=mu_store,
            nu_store=nu_store, b1=b1, b2=b2, eps=eps, eps_root=eps_root, amsgrad=amsgrad,
            nesterov=nesterov, eps_on_raw_moment=convention == "keras",
        )  # fmt: skip

    def jax_leaf_update(g, mu, nu, *nu_max, count, key=None):
        dtype = nx.compute_dtype(g.dtype)
        g32 = g.astype(dtype)
        m, v = update_moments(
            g32, mu_store.read(mu, dtype), nu_store.read(nu, dtype), b1=b1, b2=b2, dtype=dtype
        )
        bc1 = nx.one_minus_power(b1, count, dtype)
        bc2 = nx.one_minus_power(b2, count, dtype)
        if nesterov:
            b1_, one_minus_b1 = nx.decay_terms(b1, dtype)
            bc1_next = nx.one_minus_power(b1, nx.safe_increment(count), dtype)
            m_hat = b1_ * m / bc1_next + one_minus_b1 * g32 / bc1
        else:
            m_hat = m / bc1
        stored = (mu_store.write(m, mu, key), nu_store.write(v, nu, key))
        if amsgrad:
            (nu_max,) = nu_max
            previous = nu_store.read(nu_max, dtype)
            if convention == "optax":
                v_max = jnp.maximum(previous, v / bc2)
                v_hat = v_max
            else:
                v_max = jnp.maximum(previous, v)
                v_hat = v_max / bc2
            stored += (nu_store.write(v_max, nu_max, fold_key(key, 1)),)
        else:
            v_hat = v / bc2
        denom = adam_denominator(
            v_hat, bc2, eps=eps, eps_root=eps_root, eps_on_raw_moment=convention == "keras"
        )
        return ((m_hat / denom).astype(g.dtype),) + stored

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = nx.safe_increment(state.count)
        moments = (state.mu, state.nu) + ((state.nu_max,) if amsgrad else ())
        keys = leaf_keys(updates, count, mu_store, nu_store)
        direction, *new_moments = nx.map_moments(
            lambda g, key, *ms: leaf_update(g, *ms, count=count, key=key), updates, keys, *moments
        )
        if amsgrad:
            return direction, ScaleByAmsgradState(count, *new_moments)
        return direction, ScaleByAdamState(count, *new_moments)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
