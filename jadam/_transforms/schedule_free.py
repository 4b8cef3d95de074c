"""Schedule-free AdamW: no learning-rate schedule, an online average instead.

Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682.
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
    require_params,
    value_at,
    zeros_state,
)


class ScheduleFreeAdamWState(NamedTuple):
    """State of `schedule_free_adamw`; the parameters themselves are y."""

    count: jax.Array  # shape=(), dtype=int32: steps taken, saturating
    b1: jax.Array  # shape=(): the interpolation b1, kept for schedule_free_eval_params
    weight_sum: jax.Array  # shape=(): sum of the averaging weights so far ("optax")
    max_lr: jax.Array  # shape=(): largest learning rate seen so far ("optax")
    z: Any  # the base sequence the AdamW steps move, in the parameters' dtype
    nu: Any  # second moment of the gradients (nu_dtype)


def _warmup(step: jax.Array, warmup_steps: Any, dtype: Any) -> Any:
    """min(step / warmup_steps, 1), or 1 without a warmup (None or 0)."""
    if warmup_steps is None or nx.concrete_float(warmup_steps) == 0:
        return 1
    # An array under optax.inject_hyperparams: 0 still means no warmup.
    steps = jnp.asarray(warmup_steps).astype(dtype)
    return jnp.where(steps > 0, jnp.minimum(step.astype(dtype) / jnp.maximum(steps, 1), 1), 1)


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_lr_power: float | None = None,
    *,
    nu_dtype: Any = None,
    convention: str = "optax",
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-free AdamW: the parameters interpolate a base sequence and its average.

    The parameters :math:`y` are where gradients are taken; the state keeps the
    base sequence :math:`z` (started at the parameters) and the average
    :math:`x = (y - (1 - b_1) z) / b_1` (`schedule_free_eval_params`, the weights
    to evaluate). At step :math:`t = 1, 2, \dots` with learning rate
    :math:`\gamma_t` and decay :math:`\lambda`:

    .. math::
        v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \qquad
        \hat v_t = v_t / (1 - b_2^t) \\
        z_{t} = z_{t-1} - \gamma_t \big(g_t / (\sqrt{\hat v_t} + \epsilon) + \lambda y_{t-1}\big) \\
        x_{t} = (1 - c_t) x_{t-1} + c_t z_t, \qquad y_t = b_1 x_t + (1 - b_1) z_t

    The conventions differ in :math:`\gamma_t`, :math:`c_t` and the decay:

    - ``"optax"`` (`optax.contrib.schedule_free_adamw`): :math:`\gamma_t` =
      `learning_rate(t - 1)` times the warmup :math:`\min((t - 1) / T_w, 1)`;
      :math:`c_t = w_t / \sum_{i \le t} w_i` with
      :math:`w_t = (\max_{i \le t} \gamma'_i)^{r}`, where :math:`\gamma'_t` is
      the warmed-up learning rate *at* `t` (one step ahead of :math:`\gamma_t`)
      and :math:`r` = `weight_lr_power` (default 2).
    - ``"keras"`` (`keras.optimizers.ScheduleFreeAdamW`): :math:`\gamma_t` =
      `learning_rate(t - 1)` times :math:`\min(t / T_w, 1)`; uniform weights
      :math:`c_t = 1 / t`; the decay shrinks :math:`y_{t-1}` by
      :math:`1 - \lambda\,` `learning_rate(t - 1)` (no warmup factor) *before*
      the step, and the average is recovered from the shrunk :math:`y`, not
      added to :math:`z`.

    Warning: both are quirks of their reference, followed under its convention:
    optax evaluates a schedule at `t` for the weights and at `t - 1` for the
    step (its warmup makes the first step zero), and Keras' decay is not the
    paper's :math:`\gamma_t \lambda y` term in :math:`z`. The paper's own
    algorithm also folds :math:`\sqrt{1 - b_2^t}` into :math:`\gamma_t` and its
    weights; neither framework does.

    Args:
      learning_rate: step size, >= 0, or a schedule of the 0-based step.
      warmup_steps: linear warmup length (None or 0: none), an int >= 0.
      b1: interpolation between z and x, in [0, 1) (0 < b1 for eval params).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, >= 0.
      weight_decay: decay rate, >= 0, or a schedule (``"optax"``).
      weight_lr_power: :math:`r` above (``"optax"`` only; None means 2).
      nu_dtype: storage of the second moment, as in `jadam.scale_by_adam`.
      convention: ``"optax"`` or ``"keras"`` (``"pytorch"``: torch has none).
      maximize: ascend instead of descend (torch's `maximize=True`): the gradient
        is negated before everything else (the state is then a chain's tuple, which
        `schedule_free_eval_params` accepts).

    Example:
      >>> import jax.numpy as jnp, optax, jadam
      >>> tx = jadam.schedule_free_adamw(0.1)
      >>> params = {"w": jnp.array([1.0, -1.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> [round(float(x), 3) for x in jadam.schedule_free_eval_params(state, params)["w"]]
      [0.9, -0.9]
    """
    check_alias_args(learning_rate, weight_decay)
    ascent = ascent_steps(maximize)
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    nx.check_nonnegative("eps", eps)
    nx.check_convention(convention)
    if convention == "pytorch":
        raise ValueError(
            "convention='pytorch' has no schedule-free AdamW (torch.optim has none to "
            "match); use convention='optax' or 'keras'."
        )
    if warmup_steps is not None:
        number = nx.check_number("warmup_steps", warmup_steps)
        if isinstance(warmup_steps, bool) or (
            number is not None and not (number >= 0 and float(number).is_integer())
        ):
            raise ValueError(f"warmup_steps must be None or an int >= 0, got {warmup_steps!r}.")
    if weight_lr_power is None:
        weight_lr_power = 2.0
    elif convention == "keras":
        raise ValueError(
            "weight_lr_power has no Keras counterpart (keras.optimizers.ScheduleFreeAdamW "
            "averages uniformly); leave it None under convention='keras'."
        )
    else:
        nx.check_finite("weight_lr_power", weight_lr_power)
    nu_store = resolve_storage("nu_dtype", nu_dtype)

    def init_fn(params):
        wide = nx.tree_widest_float(params)
        return ScheduleFreeAdamWState(
            count=jnp.zeros([], jnp.int32),
            b1=jnp.asarray(b1).astype(wide),
            weight_sum=jnp.zeros([], wide),
            max_lr=jnp.zeros([], wide),
            z=jax.tree.map(jnp.copy, params),
            nu=zeros_state(nu_store, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "schedule_free_adamw")
        count = nx.safe_increment(state.count)  # t
        wide = state.weight_sum.dtype
        b1_ = state.b1
        base_lr = value_at(learning_rate, state.count, wide)
        wd = value_at(weight_decay, state.count, wide)
        if convention == "keras":
            lr = base_lr * _warmup(count, warmup_steps, wide)
            ck = 1 / count.astype(wide)
            shrink = 1 - base_lr * wd
            weight_sum, max_lr = state.weight_sum, state.max_lr
        else:
            lr = base_lr * _warmup(state.count, warmup_steps, wide)
            lr_ahead = value_at(learning_rate, count, wide) * _warmup(count, warmup_steps, wide)
            max_lr = jnp.maximum(state.max_lr, lr_ahead)
            weight = max_lr**weight_lr_power
            weight_sum = state.weight_sum + weight
            # 0 / 0 before any positive learning rate: no averaging yet (as optax).
            ck = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)

        def leaf(g, key, nu, z, y):
            dtype = nx.compute_dtype(g.dtype)
            g32, y32, z32 = g.astype(dtype), y.astype(dtype), z.astype(dtype)
            b1c, lrc, ckc, wdc = (x.astype(dtype) for x in (b1_, lr, ck, wd))
            b2_, one_minus_b2 = nx.decay_terms(b2, dtype)
            v = b2_ * nu_store.read(nu, dtype) + one_minus_b2 * jnp.square(g32)
            step = g32 / (jnp.sqrt(v / nx.one_minus_power(b2, count, dtype)) + eps)
            if convention == "keras":
                y32 = y32 * jnp.asarray(shrink).astype(dtype)
            else:
                step = step + wdc * y32
            z_new = z32 - lrc * step
            x_prev = (y32 - (1 - b1c) * z32) / b1c
            x = (1 - ckc) * x_prev + ckc * z_new
            y_new = b1c * x + (1 - b1c) * z_new
            return (
                (y_new - y.astype(dtype)).astype(g.dtype),
                nu_store.write(v, nu, key),
                z_new.astype(z.dtype),
                None,
            )

        keys = leaf_keys(updates, count, nu_store)
        direction, nu, z, _ = nx.map_moments(leaf, updates, keys, state.nu, state.z, params)
        return direction, ScheduleFreeAdamWState(count, state.b1, weight_sum, max_lr, z, nu)

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.chain(*ascent, tx) if ascent else tx


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The averaged weights :math:`x = (y - (1 - b_1) z) / b_1` to evaluate with.

    `state` is the state of `schedule_free_adamw`, or any state that holds exactly
    one (a chain, `optax.inject_hyperparams`, `optax.MultiSteps`); `params` are the
    training parameters :math:`y`. Returns a tree like `params`, in its dtypes.
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, ScheduleFreeAdamWState))
        if isinstance(s, ScheduleFreeAdamWState)
    ]
    if len(found) != 1:
        raise ValueError(
            "schedule_free_eval_params needs the state of one jadam.schedule_free_adamw "
            f"(found {len(found)} in the state passed)."
        )
    (sf,) = found

    def average(y, z):
        dtype = nx.compute_dtype(y.dtype)
        b1 = sf.b1.astype(dtype)
        return ((y.astype(dtype) - (1 - b1) * z.astype(dtype)) / b1).astype(y.dtype)

    return jax.tree.map(average, params, sf.z)
