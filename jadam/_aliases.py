"""The public optimizers: chains of a direction and the learning rate.

Each alias is `chain(add L2 to the gradient?, scale_by_<algo>, add decayed
weights?, scale_by_learning_rate)`, the optax layout: the sign flips in exactly
one place, `optax.scale_by_learning_rate`. Every alias takes `convention`
(see the README's table): it changes formulas, never default values.

Hyperparameters are checked when an optimizer is built: numbers must be real,
finite (NAdam's `momentum_decay` may be inf, its limit) and not bools (`True` is
not 1 here); anything else raises `ValueError` naming the argument. Schedules,
and the arrays `optax.inject_hyperparams` passes, are accepted.
"""

from __future__ import annotations

from typing import Any

import optax

from jadam import _numerics as nx
from jadam._transforms.adam import scale_by_adam
from jadam._transforms.adamax import scale_by_adamax
from jadam._transforms.nadam import scale_by_nadam
from jadam._transforms.radam import scale_by_radam

ScalarOrSchedule = Any  # a float, or an optax schedule `step -> float`


def _is_python_zero(x: Any) -> bool:
    # Decided by type, not value, so that optax.inject_hyperparams (which
    # passes arrays to both init and update) always builds the same chain.
    return isinstance(x, (int, float)) and x == 0


def _with_learning_rate(
    direction: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    *,
    l2: Any = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """`direction` with coupled L2 before it, decoupled decay after, then -lr."""
    nx.check_nonnegative("learning_rate", learning_rate)
    nx.check_nonnegative("l2", l2)
    nx.check_nonnegative("weight_decay", weight_decay)
    steps = []
    if not _is_python_zero(l2):
        # Coupled L2, torch.optim.Adam(weight_decay=l2): g + l2 * p enters the moments.
        steps.append(optax.add_decayed_weights(l2))
    steps.append(direction)
    if not _is_python_zero(weight_decay):
        # Decoupled (Loshchilov & Hutter): -lr * (direction + wd * p).
        steps.append(optax.add_decayed_weights(weight_decay, mask))
    steps.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*steps)


_COMMON_ARGS = """
    learning_rate: step size, finite and >= 0, or an optax schedule.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment (Adamax: of the infinity norm), in [0, 1).
    eps: stability term, finite and >= 0; where it sits depends on `convention`.
    mu_dtype, nu_dtype: storage dtype of each moment; None stores in the
      parameter's compute dtype (float32 for bf16/f16/f32 parameters).
    convention: "optax" (default), "pytorch" or "keras": whose formulas to follow."""


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    l2: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """Adam (Kingma & Ba, arXiv:1412.6980). See `scale_by_adam` for the formulas.

    Matches `optax.adam`, `torch.optim.Adam(weight_decay=l2)` and
    `keras.optimizers.Adam` under the matching `convention` (Keras' default
    `epsilon` is 1e-7: pass `eps=1e-7` to reproduce a Keras run).

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient (`g + l2 * p`), finite and >= 0.

    Example:
      >>> import jax.numpy as jnp, optax, jadam
      >>> params = {{"w": jnp.array([1.0, -2.0])}}
      >>> tx = jadam.adam(0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({{"w": jnp.array([0.5, -0.5])}}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([ 0.9, -1.9], dtype=float32)
    """
    return _with_learning_rate(
        scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention
        ),
        learning_rate,
        l2=l2,
    )


def amsgrad(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    l2: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """AMSGrad (Reddi et al., arXiv:1904.09237): Adam with a running max of v.

    Warning: optax keeps the maximum of the bias-corrected second moment,
    PyTorch (`Adam(amsgrad=True)`) and Keras (`Adam(amsgrad=True)`) of the raw
    one; the trajectories differ from the first step on. Pick `convention`.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient, finite and >= 0.
    """
    return _with_learning_rate(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            amsgrad=True,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        l2=l2,
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101): Adam with decoupled decay.

    The step is `-learning_rate * (adam_direction + weight_decay * p)`, which is
    `torch.optim.AdamW` and `keras.optimizers.AdamW` (both shrink `p` by
    `1 - lr * wd` before the Adam step). The default `weight_decay` is optax's
    1e-4 whatever the convention (PyTorch's is 1e-2, Keras' 4e-3).

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: a pytree of booleans (or a function of the params returning one)
        selecting the leaves to decay, as in `optax.add_decayed_weights`.
    """
    return _with_learning_rate(
        scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention
        ),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
    )


def adamax(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    l2: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """Adamax (Kingma & Ba, section 7.1). See `scale_by_adamax` for the formulas.

    Warning: optax and PyTorch put epsilon inside the maximum, Keras adds it to
    the norm afterwards.

    Args:{common}
      l2: coupled L2 penalty added to the gradient, finite and >= 0
        (`torch.optim.Adamax(weight_decay=)`).
    """
    return _with_learning_rate(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention),
        learning_rate,
        l2=l2,
    )


def adamaxw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """Adamax with decoupled weight decay (`keras.optimizers.Adamax(weight_decay=)`).

    Args:{common}
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
    """
    return _with_learning_rate(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
    )


def nadam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    l2: float = 0.0,
    momentum_decay: float | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """NAdam (Dozat 2016). See `scale_by_nadam` for the formulas.

    Warning: the frameworks disagree on the momentum schedule. optax uses a
    constant b1, PyTorch `0.96**(t * 0.004)`, Keras `0.96**t`; with
    `momentum_decay=None` each convention uses its own.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient, finite and >= 0.
      momentum_decay: the schedule's psi, >= 0 (inf: a constant b1), or None for the
        convention's.
    """
    return _with_learning_rate(
        scale_by_nadam(
            b1,
            b2,
            eps,
            eps_root,
            momentum_decay=momentum_decay,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        l2=l2,
    )


def nadamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    momentum_decay: float | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """NAdam with decoupled weight decay (`torch.optim.NAdam(decoupled_weight_decay=True)`).

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      momentum_decay: the schedule's psi, >= 0 (inf: a constant b1), or None for the
        convention's.
    """
    return _with_learning_rate(
        scale_by_nadam(
            b1,
            b2,
            eps,
            eps_root,
            momentum_decay=momentum_decay,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
    )


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    l2: float = 0.0,
    threshold: float = 5.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
) -> optax.GradientTransformationExtraArgs:
    """RAdam (Liu et al., arXiv:1908.03265). See `scale_by_radam` for the formulas.

    Warning: PyTorch rectifies where rho_t > 5 and adds epsilon before the bias
    correction; optax where rho_t >= threshold, epsilon after. Keras has none.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient, finite and >= 0.
      threshold: rho_t below which the step is plain momentum.
    """
    return _with_learning_rate(
        scale_by_radam(
            b1,
            b2,
            eps,
            eps_root,
            threshold=threshold,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        l2=l2,
    )


for _alias in (adam, amsgrad, adamw, adamax, adamaxw, nadam, nadamw, radam):
    _alias.__doc__ = _alias.__doc__.format(common=_COMMON_ARGS)
