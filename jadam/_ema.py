"""An exponential moving average of the weights, as an optax transformation.

`optax.ema` averages updates; this averages the parameters themselves (Keras'
`use_ema`, `torch.optim.swa_utils.AveragedModel` with an EMA function). It sits
last in a chain and passes the updates through untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx


class EmaParamsState(NamedTuple):
    """State of `ema_params`."""

    count: jax.Array  # shape=(), dtype=int32: steps averaged so far
    ema: Any  # the averaged weights: the params' tree, in their compute dtype


def ema_params(decay: Any, *, debias: bool = True) -> optax.GradientTransformationExtraArgs:
    r"""Keep an exponential moving average of the weights after each step.

    Place it *last* in the chain, after the learning rate, so that the updates
    it sees are the ones applied. Since optax transformations see the weights
    before the step, it averages the post-step weights
    `w_t = optax.apply_updates(params, updates)` (rounded to the parameter
    dtype as `apply_updates` rounds them):

    .. math::

      \bar w_1 = w_1, \qquad
      \bar w_t = (1 - c_t)\, \bar w_{t-1} + c_t\, w_t, \qquad
      c_t = \begin{cases} (1 - d) / (1 - d^t) & \text{debias=True} \\
                          1 - d & \text{debias=False} \end{cases}

    with `d = decay`. `debias=True` is the zero-initialised average divided by
    `1 - d^t`, the weights `(1 - d) d^{t-k} / (1 - d^t)` summing to one (as
    `optax.ema(debias=True)` and TensorFlow's `ExponentialMovingAverage` with
    `zero_debias`). `debias=False` gives the first post-step weights the whole
    remaining mass `d^{t-1}`: that is Keras' `use_ema=True, ema_momentum=d` and
    `torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=get_ema_multi_avg_fn(d))` updated after every
    `optimizer.step()`. Keras with `ema_overwrite_frequency=k` also copies the
    average into the model every `k` steps, which changes the training
    trajectory; here the average never feeds back (Keras' default, `None`,
    copies it once, in `finalize_variable_values` at the end of `fit`).

    Read the average with `jadam.ema_params_of(state)`. Before any step it is
    the initial weights. It is kept in the parameters' compute dtype (float32
    for bf16/f16 weights, where `1 - 0.999` would round away) and never changes
    the updates, so it composes with `optax.chain`, `MultiSteps` (it averages
    once per real step), `jit` and `lax.scan`; `None` leaves pass through.

    Args:
      decay: `d`, in [0, 1): the weight of the previous average.
      debias: divide the zero-started average by `1 - d^t` (default), or start
        from the first post-step weights as Keras and PyTorch do.

    Example:
      >>> import jax.numpy as jnp, optax, jadam
      >>> tx = optax.chain(optax.sgd(1.0), jadam.ema_params(0.5))
      >>> params = {"w": jnp.array(0.0)}
      >>> state = tx.init(params)
      >>> for g in (-1.0, -1.0):
      ...     updates, state = tx.update({"w": jnp.array(g)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"], jadam.ema_params_of(state)["w"]  # (1 * 1 + 2 * 2) / 3
      (Array(2., dtype=float32), Array(1.6666667, dtype=float32))
    """
    nx.check_decay("decay", decay)
    if not isinstance(debias, bool):
        raise ValueError(f"debias must be True or False, got {debias!r}.")

    def init_fn(params: Any) -> EmaParamsState:
        ema = jax.tree.map(
            lambda p: None if p is None else jnp.asarray(p).astype(nx.compute_dtype(p.dtype)),
            params,
            is_leaf=nx.is_none,
        )
        return EmaParamsState(count=jnp.zeros([], jnp.int32), ema=ema)

    def update_fn(
        updates: Any, state: EmaParamsState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmaParamsState]:
        del extra
        if params is None:
            raise ValueError(
                "ema_params averages the weights: call update(updates, state, params) "
                "with the current params."
            )
        count = nx.safe_increment(state.count)
        dtype = nx.tree_widest_float(state.ema)
        _, one_minus = nx.decay_terms(decay, dtype)
        if debias:
            # (1 - d) / (1 - d^t): 1 at t = 1, so the start value never matters.
            weight = one_minus / nx.one_minus_power(decay, count, dtype)
        else:
            weight = jnp.where(count == 1, 1, jnp.asarray(one_minus, dtype))
        treedef, averages = nx.flatten_like(updates, state.ema)
        new = []
        for u, p, avg in zip(
            treedef.flatten_up_to(updates), treedef.flatten_up_to(params), averages, strict=True
        ):
            if avg is None or u is None:
                new.append(avg)
                continue
            # The weights as apply_updates leaves them, rounding included.
            w = jnp.asarray(p + u).astype(jnp.asarray(p).dtype).astype(avg.dtype)
            c = jnp.asarray(weight, avg.dtype)
            new.append((1 - c) * avg + c * w)
        return updates, EmaParamsState(count=count, ema=treedef.unflatten(new))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_params_of(state: Any) -> Any:
    """The averaged weights held by the one `ema_params` inside an optimizer state.

    `state` is the state of `ema_params` itself or of any chain, wrapper
    (`inject_hyperparams`, `MultiSteps`, `partition`) or container holding it.
    Raises `ValueError` when it holds none or more than one.
    """
    found = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, EmaParamsState))
        if isinstance(leaf, EmaParamsState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"ema_params_of needs an optimizer state holding exactly one ema_params state; "
            f"this one holds {len(found)}. Add jadam.ema_params(decay) as the last element "
            "of the optax.chain."
        )
    return found[0].ema
