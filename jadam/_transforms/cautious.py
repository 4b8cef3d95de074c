"""Cautious updates (Liang et al., "Cautious Optimizers", arXiv:2411.16085).

A wrapper around any gradient transformation: it keeps the components of the
update that point downhill for the current gradient, zeroes the others, and
rescales what is kept so that the mean step size per parameter tensor is
preserved.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jadam import _numerics as nx

_OUTPUTS = ("update", "direction")


def cautious(
    tx: optax.GradientTransformation,
    *,
    eps: float = 1e-3,
    output: str = "update",
) -> optax.GradientTransformationExtraArgs:
    r"""Mask the components of `tx`'s update that disagree in sign with the gradient.

    With `g` the gradient this transformation receives and `u` the update `tx`
    returns for it, each parameter tensor's update becomes

    .. math::

      \phi = \mathbb{1}[\,u \odot g \text{ points downhill}\,], \qquad
      u' = u \odot \phi \,/\, \max(\operatorname{mean}(\phi), \text{eps}),

    the mean taken over the tensor's entries (Algorithm 1 of the paper; a tensor
    whose components all agree is left unchanged, one with no agreeing
    component gets a zero update). "Downhill" depends on what `tx` returns:

    - `output="update"` (default): `tx` is a whole optimizer whose update is
      *added* to the parameters (`optax.apply_updates`), such as `jadam.adamw`
      or `optax.adam`; it ends in `scale_by_learning_rate`, so its update is
      `-lr * direction` and a component is kept where `u * g < 0`.
    - `output="direction"`: `tx` is a building block before the learning rate,
      such as `jadam.scale_by_adam`, whose output is *subtracted* after scaling;
      a component is kept where `u * g > 0`, the paper's `u * g > 0`.

    Entries where `u * g == 0` are dropped. The state is `tx`'s state, unchanged
    in structure, so `cautious` composes with `optax.chain`, `jit`, `lax.scan`
    and checkpoints of the inner optimizer.

    Wrapping a whole `jadam.adamw` masks its decoupled decay term as well. The
    paper's C-AdamW (and the authors' code) decays every weight unmasked; build
    that as

      >>> import optax, jadam
      >>> c_adamw = optax.chain(
      ...     jadam.cautious(jadam.scale_by_adam(), output="direction"),
      ...     optax.add_decayed_weights(1e-2),
      ...     optax.scale_by_learning_rate(1e-3),
      ... )

    Args:
      tx: any optax `GradientTransformation` (jadam or optax).
      eps: floor of the kept fraction, >= 0. The authors' code and timm clamp
        the mean at 1e-3; the paper's listing writes `mean + eps` instead,
        which scales a fully agreeing update by `1 / (1 + eps)`.
      output: "update" or "direction": how to read `tx`'s output (above).

    Returns:
      An `optax.GradientTransformationExtraArgs` with `tx`'s `init` and state.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = jadam.cautious(optax.sgd(0.1, momentum=0.9))
      >>> params = {"w": jnp.zeros(4)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([1.0, 1.0, 1.0, 1.0])}, state, params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0, -0.5, -0.5])}, state, params)
      >>> updates["w"]  # the momentum disagrees with the last two gradients
      Array([-0.38, -0.38, -0.  , -0.  ], dtype=float32)
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(
            f"tx must be an optax GradientTransformation (e.g. jadam.adamw(...)), got {tx!r}."
        )
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}.")
    nx.check_nonnegative("eps", eps)
    inner = optax.with_extra_args_support(tx)
    descent_sign = -1 if output == "update" else 1

    def caution(u: Any, g: Any) -> Any:
        if u is None or g is None or jnp.size(u) == 0:
            return u
        dtype = nx.compute_dtype(u.dtype)
        uc = u.astype(dtype)
        # Both signs in the compute dtype: a bf16 product can underflow to zero.
        keep = (descent_sign * uc * g.astype(dtype)) > 0
        # The kept fraction from an integer count: a float32 sum of ones stops
        # counting at 2**24 entries.
        fraction = jnp.sum(keep, dtype=jnp.int32).astype(dtype) / u.size
        scale = 1 / jnp.maximum(fraction, jnp.asarray(eps, dtype))
        # eps == 0 and nothing kept: the update is zero, not 0 * inf.
        scale = jnp.where(fraction > 0, scale, 0)
        # A product, not a select, so that a NaN update stays NaN (apply_if_finite).
        return (uc * keep.astype(dtype) * scale).astype(u.dtype)

    def init_fn(params: Any) -> Any:
        return inner.init(params)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        new_updates, new_state = inner.update(updates, state, params, **extra)
        treedef = jax.tree.structure(new_updates, is_leaf=nx.is_none)
        grads = treedef.flatten_up_to(updates)
        masked = [
            caution(u, g) for u, g in zip(treedef.flatten_up_to(new_updates), grads, strict=True)
        ]
        return treedef.unflatten(masked), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
