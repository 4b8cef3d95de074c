"""The public optimizers: chains of a direction and the learning rate.

Each alias is `chain(negate the gradient?, add L2 to the gradient?, scale_by_<algo>,
add decayed weights?, scale_by_learning_rate)`, the optax layout: descent's sign
flips in exactly one place, `optax.scale_by_learning_rate`, and `maximize=True`
(torch's) negates the gradient before everything else. Every alias takes
`convention` (see the README's table): it changes formulas, never default values.

Hyperparameters are checked when an optimizer is built: numbers must be real,
finite (NAdam's `momentum_decay` may be inf, its limit) and not bools (`True` is
not 1 here); anything else raises `ValueError` naming the argument. Schedules,
and the arrays `optax.inject_hyperparams` passes, are accepted.
"""

from __future__ import annotations

from typing import Any

import optax

from jadam import _numerics as nx
from jadam._transforms._common import ScalarOrSchedule, with_learning_rate
from jadam._transforms.adam import scale_by_adam
from jadam._transforms.adamax import scale_by_adamax
from jadam._transforms.nadam import scale_by_nadam
from jadam._transforms.radam import scale_by_radam


def _check_nesterov(nesterov: Any, convention: Any) -> bool:
    """Nesterov momentum in Adam is optax's option; torch's and Keras' Adam have none."""
    nesterov = nx.check_flag("nesterov", nesterov)
    framework = {"pytorch": "torch.optim.Adam", "keras": "keras.optimizers.Adam"}.get(
        nx.check_convention(convention)
    )
    if nesterov and framework is not None:
        raise ValueError(
            f"nesterov=True has no counterpart under convention={convention!r} ({framework} "
            f"has no Nesterov option): use convention='optax', or jadam.nadam(convention="
            f"{convention!r}) for that framework's NAdam."
        )
    return nesterov


_COMMON_ARGS = """
    learning_rate: step size, finite and >= 0, or an optax schedule.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment (Adamax: of the infinity norm), in [0, 1).
    eps: stability term, finite and >= 0; where it sits depends on `convention`.
    mu_dtype, nu_dtype: storage dtype of each moment; None stores in the
      parameter's compute dtype (float32 for bf16/f16/f32 parameters).
    convention: "optax" (default), "pytorch" or "keras": whose formulas to follow.
    maximize: ascend instead of descend (torch's `maximize=True`): the gradient is
      negated before anything else, coupled L2 included; a decoupled decay still
      shrinks the parameters."""


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    l2: float = 0.0,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam (Kingma & Ba, arXiv:1412.6980). See `scale_by_adam` for the formulas.

    Matches `optax.adam`, `torch.optim.Adam(weight_decay=l2, maximize=)` and
    `keras.optimizers.Adam` under the matching `convention` (Keras' default
    `epsilon` is 1e-7: pass `eps=1e-7` to reproduce a Keras run).

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient (`g + l2 * p`), finite and >= 0.
      nesterov: Nesterov momentum with a constant b1, `optax.adam(nesterov=True)`:
        `m_hat = b1 m / (1 - b1**(t+1)) + (1 - b1) g / (1 - b1**t)`. torch's and
        Keras' Adam have no such option: True raises `ValueError` under their
        conventions (their NAdam is `jadam.nadam`).

    Example:
      >>> import jax.numpy as jnp, optax, jadam
      >>> params = {{"w": jnp.array([1.0, -2.0])}}
      >>> tx = jadam.adam(0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({{"w": jnp.array([0.5, -0.5])}}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([ 0.9, -1.9], dtype=float32)
    """
    return with_learning_rate(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            nesterov=_check_nesterov(nesterov, convention),
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        l2=l2,
        maximize=maximize,
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AMSGrad (Reddi et al., arXiv:1904.09237): Adam with a running max of v.

    Warning: optax keeps the maximum of the bias-corrected second moment,
    PyTorch (`Adam(amsgrad=True)`) and Keras (`Adam(amsgrad=True)`) of the raw
    one; the trajectories differ from the first step on. Pick `convention`.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient, finite and >= 0.
    """
    return with_learning_rate(
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
        maximize=maximize,
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
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
    maximize: bool = False,
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
      nesterov: Nesterov momentum, `optax.adamw(nesterov=True)`; as in `jadam.adam`
        (True raises `ValueError` under "pytorch" and "keras").
    """
    return with_learning_rate(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            nesterov=_check_nesterov(nesterov, convention),
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            convention=convention,
        ),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )


def amsgradw(
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AMSGrad with decoupled weight decay: `-learning_rate * (amsgrad_direction + wd * p)`.

    Matches `torch.optim.AdamW(amsgrad=True)` and `keras.optimizers.AdamW(amsgrad=True)`
    (both shrink `p` by `1 - lr * wd` before the step) and, under "optax" (which has
    no alias for it), `optax.chain(optax.scale_by_amsgrad(...),
    optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(lr))`.
    The default `weight_decay` is optax's 1e-4 whatever the convention.

    Warning: as in `jadam.amsgrad`, optax keeps the maximum of the bias-corrected
    second moment, PyTorch and Keras of the raw one.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
    """
    return with_learning_rate(
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
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adamax (Kingma & Ba, section 7.1). See `scale_by_adamax` for the formulas.

    Warning: optax and PyTorch put epsilon inside the maximum, Keras adds it to
    the norm afterwards.

    Args:{common}
      l2: coupled L2 penalty added to the gradient, finite and >= 0
        (`torch.optim.Adamax(weight_decay=)`).
    """
    return with_learning_rate(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention),
        learning_rate,
        l2=l2,
        maximize=maximize,
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adamax with decoupled weight decay (`keras.optimizers.Adamax(weight_decay=)`).

    Args:{common}
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
    """
    return with_learning_rate(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, convention=convention),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
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
    maximize: bool = False,
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
    return with_learning_rate(
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
        maximize=maximize,
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """NAdam with decoupled weight decay (`torch.optim.NAdam(decoupled_weight_decay=True)`).

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      momentum_decay: the schedule's psi, >= 0 (inf: a constant b1), or None for the
        convention's.
    """
    return with_learning_rate(
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
        maximize=maximize,
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
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """RAdam (Liu et al., arXiv:1908.03265). See `scale_by_radam` for the formulas.

    Warning: PyTorch rectifies where rho_t > 5 and adds epsilon before the bias
    correction; optax where rho_t >= threshold, epsilon after. Keras has none.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      l2: coupled L2 penalty added to the gradient, finite and >= 0.
      threshold: rho_t below which the step is plain momentum.
    """
    return with_learning_rate(
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
        maximize=maximize,
    )


def radamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    threshold: float = 5.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    convention: str = "optax",
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """RAdam with decoupled weight decay: `-learning_rate * (radam_direction + wd * p)`.

    Matches `torch.optim.RAdam(decoupled_weight_decay=True)` (which shrinks `p` by
    `1 - lr * wd` before the step) and, under "optax" (which has no alias for it),
    `optax.chain(optax.scale_by_radam(...), optax.add_decayed_weights(weight_decay,
    mask), optax.scale_by_learning_rate(lr))`. Keras has no RAdam: "keras" raises
    `ValueError`. The default `weight_decay` is optax's 1e-4 whatever the convention.

    Warning: as in `jadam.radam`, PyTorch rectifies where rho_t > 5 and adds epsilon
    before the bias correction; optax where rho_t >= threshold, epsilon after.

    Args:{common}
      eps_root: added inside the square root, finite and >= 0.
      weight_decay: decoupled decay rate, finite and >= 0, or a schedule.
      mask: which leaves to decay, as in `optax.add_decayed_weights`.
      threshold: rho_t below which the step is plain momentum.
    """
    return with_learning_rate(
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
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )


for _alias in (adam, amsgrad, adamw, amsgradw, adamax, adamaxw, nadam, nadamw, radam, radamw):
    _alias.__doc__ = _alias.__doc__.format(common=_COMMON_ARGS)
