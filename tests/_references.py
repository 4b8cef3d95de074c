"""Independent references for jadam's parity tests.

Two kinds of reference, both written without looking at ``jadam/``:

1. ``numpy_trajectory``: float64 NumPy transcriptions of each algorithm family
   (Adam/AMSGrad/AdamW/AMSGradW, Adamax/AdamaxW, NAdam/NAdamW, RAdam/RAdamW), one readable
   function per family with a ``convention`` switch. They are transcribed from the
   papers and from the frameworks' own installed sources:

   * torch 2.13: ``torch/optim/{adam,adamax,nadam,radam}.py`` (``_single_tensor_*``),
   * keras 3.15: ``keras/src/optimizers/{adam,adamax,nadam,base_optimizer}.py``,
   * optax 0.2.8: ``optax/_src/{alias,transform}.py``, ``optax/tree_utils/_tree_math.py``.

2. ``optax_trajectory``, ``torch_trajectory``, ``keras_trajectory``: runners that
   execute the real framework for N steps.

Every runner takes the same arguments: the jadam optimizer name (``"adam"``,
``"adamw"``, ...), the initial parameters as a list of arrays (their dtype, float32
or float64, is the dtype of the run), a gradient function
``grad_fn(count, params) -> grads`` (``count`` is 0 on the first step; params and
grads are lists of NumPy arrays in the run's dtype), the number of steps, and the
hyperparameters under jadam's keyword names (``learning_rate``, ``b1``, ``b2``,
``eps``, ``eps_root``, ``l2``, ``weight_decay``, ``mask``, ``momentum_decay``,
``threshold``, ``nesterov``, ``maximize``). ``learning_rate`` and ``weight_decay``
may be schedules: callables of the 0-based step count, as in optax (step t = 1, 2,
... uses ``schedule(t - 1)``).
``mask`` is a list of booleans, one per leaf (True: the leaf is decayed).

Each runner returns the trajectory: one array per leaf, of shape
``(steps + 1, *leaf.shape)``, row 0 being the initial value.

The symbols below: t is the 1-based step, g the gradient, m the first moment, v the
second moment, u Adamax's infinity norm, lr and wd the (scheduled) learning rate
and decoupled weight decay at step t.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

GradFn = Callable[[int, list[np.ndarray]], list[np.ndarray]]
Trajectory = list[np.ndarray]

OPTIMIZERS = (
    "adam",
    "amsgrad",
    "adamw",
    "amsgradw",
    "adamax",
    "adamaxw",
    "nadam",
    "nadamw",
    "radam",
    "radamw",
)
CONVENTIONS = ("optax", "pytorch", "keras")
# The decoupled ("w") forms: they take weight_decay and mask.
DECOUPLED = ("adamw", "amsgradw", "adamaxw", "nadamw", "radamw")
# The optimizers with Nesterov momentum as an option (optax.adam(nesterov=True)).
NESTEROV = ("adam", "adamw")
# torch.optim.NAdam's default momentum_decay (psi); jadam's momentum_decay=None
# means this under the pytorch convention.
TORCH_MOMENTUM_DECAY = 0.004
# Keras' Nadam decays its momentum with 0.96**t: psi = 1 in torch's 0.96**(t*psi).
KERAS_MOMENTUM_DECAY = 1.0
# torch.optim.RAdam hard-codes its rectification threshold: rho_t > 5.
TORCH_RADAM_THRESHOLD = 5.0


class NoCounterpart(NotImplementedError):
    """The framework has no way to express these hyperparameters."""


def _at(value: float | Callable[[int], Any], count: int) -> float:
    """The value of a constant or schedule at a 0-based step count, as a Python float."""
    return float(value(count)) if callable(value) else float(value)


def _stack(traj: list[list[np.ndarray]]) -> Trajectory:
    return [np.stack([step[i] for step in traj]) for i in range(len(traj[0]))]


def _family(opt: str) -> str:
    if opt in ("adam", "amsgrad", "adamw", "amsgradw"):
        return "adam"
    if opt in ("adamax", "adamaxw"):
        return "adamax"
    if opt in ("nadam", "nadamw"):
        return "nadam"
    if opt in ("radam", "radamw"):
        return "radam"
    raise ValueError(f"unknown optimizer {opt!r}")


def _hp(opt: str, hp: dict[str, Any]) -> dict[str, Any]:
    """Checks the hyperparameter names, fills the neutral values of optional ones."""
    allowed = {"learning_rate", "b1", "b2", "eps", "eps_root", "l2", "maximize"}
    if opt in DECOUPLED:
        allowed |= {"weight_decay", "mask"}
        allowed -= {"l2"}  # jadam's w forms have no coupled L2.
    if opt in ("nadam", "nadamw"):
        allowed |= {"momentum_decay"}
    if opt in ("radam", "radamw"):
        allowed |= {"threshold"}
    if opt in NESTEROV:
        allowed |= {"nesterov"}
    if opt in ("adamax", "adamaxw"):
        allowed -= {"eps_root"}
    unknown = set(hp) - allowed
    if unknown:
        raise TypeError(f"{opt}: unexpected hyperparameters {sorted(unknown)}")
    for name in ("learning_rate", "b1", "b2", "eps"):
        if name not in hp:
            raise TypeError(f"{opt}: pass {name} explicitly (defaults differ by framework)")
    out = dict(
        eps_root=0.0,
        l2=0.0,
        weight_decay=0.0,
        mask=None,
        momentum_decay=None,
        threshold=5.0,
        nesterov=False,
        maximize=False,
    )
    out.update(hp)
    return out


# --------------------------------------------------------------------------------------
# 1. NumPy transcriptions (float64, plain loops over leaves)
# --------------------------------------------------------------------------------------


def numpy_adam(
    params,
    grad_fn,
    steps,
    *,
    convention,
    amsgrad,
    nesterov,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    l2,
    weight_decay,
    mask,
):
    """Adam (Kingma & Ba 2014, arXiv:1412.6980), AMSGrad (Reddi et al. 2018), AdamW
    (Loshchilov & Hutter 2017, arXiv:1711.05101) and AMSGrad with AdamW's decay.

        g   <- g + l2 * p                          (coupled L2; torch Adam(weight_decay))
        m   <- b1 m + (1 - b1) g
        v   <- b2 v + (1 - b2) g^2
        optax:   v_hat = v / (1 - b2^t);  AMSGrad: v_max = max(v_max, v_hat)
                 d = m / (1 - b1^t) / (sqrt(v_hat + eps_root) + eps)
                 nesterov (optax.adam(nesterov=True)): m / (1 - b1^t) above becomes
                   b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
                 p <- p - lr (d + wd p)
        pytorch: AMSGrad: v_max = max(v_max, v)    (raw v)
                 p <- p (1 - lr wd)
                 p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        keras:   AMSGrad: v_max = max(v_max, v)    (raw v)
                 p <- p - p wd lr
                 p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
                 (the paper's "epsilon hat": eps is not divided by sqrt(1 - b2^t))
    """
    if convention != "optax" and eps_root != 0.0:
        raise NoCounterpart(f"{convention} Adam has no eps_root")
    if convention != "optax" and nesterov:
        raise NoCounterpart(f"{convention} Adam has no Nesterov momentum")
    p = [np.array(x, dtype=np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    v_max = [np.zeros_like(x) for x in p]
    traj = [[x.copy() for x in p]]
    for t in range(1, steps + 1):
        lr = _at(learning_rate, t - 1)
        grads = grad_fn(t - 1, [x.copy() for x in p])
        for i in range(len(p)):
            wd = _at(weight_decay, t - 1) if (mask is None or mask[i]) else 0.0
            g = np.asarray(grads[i], np.float64) + l2 * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            bc1 = 1 - b1**t
            bc2 = 1 - b2**t
            if convention == "optax":
                v_hat = v[i] / bc2
                if amsgrad:
                    v_max[i] = np.maximum(v_max[i], v_hat)
                    v_hat = v_max[i]
                if nesterov:
                    m_hat = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / bc1
                else:
                    m_hat = m[i] / bc1
                d = m_hat / (np.sqrt(v_hat + eps_root) + eps)
                p[i] = p[i] - lr * (d + wd * p[i])
            elif convention == "pytorch":
                v_use = v[i]
                if amsgrad:
                    v_max[i] = np.maximum(v_max[i], v[i])
                    v_use = v_max[i]
                p[i] = p[i] * (1 - lr * wd)
                p[i] = p[i] - (lr / bc1) * m[i] / (np.sqrt(v_use) / np.sqrt(bc2) + eps)
            elif convention == "keras":
                v_use = v[i]
                if amsgrad:
                    v_max[i] = np.maximum(v_max[i], v[i])
                    v_use = v_max[i]
                p[i] = p[i] - p[i] * wd * lr
                alpha = lr * np.sqrt(bc2) / bc1
                p[i] = p[i] - alpha * m[i] / (np.sqrt(v_use) + eps)
            else:
                raise ValueError(convention)
        traj.append([x.copy() for x in p])
    return _stack(traj)


def numpy_adamax(
    params, grad_fn, steps, *, convention, learning_rate, b1, b2, eps, l2, weight_decay, mask
):
    """Adamax (Kingma & Ba 2014, section 7.1), and AdamaxW (decoupled decay).

    g <- g + l2 p
    m <- b1 m + (1 - b1) g
    optax, pytorch: u <- max(b2 u, |g| + eps)       (eps inside the max)
                    d = m / (1 - b1^t) / u
    keras:          u <- max(b2 u, |g|)
                    d = m / ((1 - b1^t) (u + eps))  (eps added to u)
    decay: optax p <- p - lr (d + wd p); pytorch p <- p (1 - lr wd) then p - lr d;
           keras p <- p - p wd lr then p - lr d.
    """
    p = [np.array(x, dtype=np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    u = [np.zeros_like(x) for x in p]
    traj = [[x.copy() for x in p]]
    for t in range(1, steps + 1):
        lr = _at(learning_rate, t - 1)
        grads = grad_fn(t - 1, [x.copy() for x in p])
        for i in range(len(p)):
            wd = _at(weight_decay, t - 1) if (mask is None or mask[i]) else 0.0
            g = np.asarray(grads[i], np.float64) + l2 * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            bc1 = 1 - b1**t
            if convention in ("optax", "pytorch"):
                u[i] = np.maximum(b2 * u[i], np.abs(g) + eps)
                d = m[i] / bc1 / u[i]
            elif convention == "keras":
                u[i] = np.maximum(b2 * u[i], np.abs(g))
                d = m[i] / (bc1 * (u[i] + eps))
            else:
                raise ValueError(convention)
            if convention == "optax":
                p[i] = p[i] - lr * (d + wd * p[i])
            else:
                p[i] = p[i] * (1 - lr * wd)
                p[i] = p[i] - lr * d
        traj.append([x.copy() for x in p])
    return _stack(traj)


def numpy_nadam(
    params,
    grad_fn,
    steps,
    *,
    convention,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    l2,
    weight_decay,
    mask,
    momentum_decay,
):
    """NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), NAdamW.

    g <- g + l2 p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    optax (constant momentum, optax.adam(nesterov=True)):
        m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
        d = m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps);  p <- p - lr (d + wd p)
    pytorch, keras (Dozat's momentum schedule, psi = momentum_decay):
        mu_t = b1 (1 - 0.5 * 0.96^(t psi)),  P_t = mu_1 ... mu_t
        m_hat = mu_{t+1} m / (1 - P_t mu_{t+1}) + (1 - mu_t) g / (1 - P_t)
        p <- p (1 - lr wd) [pytorch] or p - p wd lr [keras]
        p <- p - lr m_hat / (sqrt(v / (1 - b2^t)) + eps)
        psi defaults to 0.004 (torch) and is 1 for keras (0.96^t).
    """
    if convention == "optax" and momentum_decay is not None:
        raise NoCounterpart("optax's NAdam has a constant momentum (no momentum_decay)")
    if convention != "optax" and eps_root != 0.0:
        raise NoCounterpart(f"{convention} NAdam has no eps_root")
    if momentum_decay is None:
        momentum_decay = {"pytorch": TORCH_MOMENTUM_DECAY, "keras": KERAS_MOMENTUM_DECAY}.get(
            convention
        )
    p = [np.array(x, dtype=np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    mu_product = 1.0
    traj = [[x.copy() for x in p]]
    for t in range(1, steps + 1):
        lr = _at(learning_rate, t - 1)
        grads = grad_fn(t - 1, [x.copy() for x in p])
        if convention != "optax":
            mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
            mu_product = mu_product * mu_t
        for i in range(len(p)):
            wd = _at(weight_decay, t - 1) if (mask is None or mask[i]) else 0.0
            g = np.asarray(grads[i], np.float64) + l2 * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            v_hat = v[i] / (1 - b2**t)
            if convention == "optax":
                m_hat = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
                d = m_hat / (np.sqrt(v_hat + eps_root) + eps)
                p[i] = p[i] - lr * (d + wd * p[i])
            elif convention in ("pytorch", "keras"):
                m_hat = mu_next * m[i] / (1 - mu_product * mu_next) + (1 - mu_t) * g / (
                    1 - mu_product
                )
                if convention == "pytorch":
                    p[i] = p[i] * (1 - lr * wd)
                else:
                    p[i] = p[i] - p[i] * wd * lr
                p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
            else:
                raise ValueError(convention)
        traj.append([x.copy() for x in p])
    return _stack(traj)


def numpy_radam(
    params,
    grad_fn,
    steps,
    *,
    convention,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    l2,
    threshold,
    weight_decay,
    mask,
):
    """RAdam (Liu et al. 2019, arXiv:1908.03265), and RAdamW (decoupled decay).

    g <- g + l2 p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    rho_inf = 2 / (1 - b2) - 1,   rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    m_hat = m / (1 - b1^t)
    optax:   if rho_t >= threshold: d = r_t m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)
    pytorch: if rho_t >  threshold: d = r_t m_hat sqrt(1 - b2^t) / (sqrt(v) + eps)
             (eps added to the square root of the raw v)
    otherwise d = m_hat (SGD with momentum)
    optax: p <- p - lr (d + wd p);  pytorch (RAdam(decoupled_weight_decay=True)):
    p <- p (1 - lr wd), then p <- p - lr d.
    """
    if convention == "keras":
        raise NoCounterpart("Keras has no RAdam")
    if convention != "optax" and eps_root != 0.0:
        raise NoCounterpart(f"{convention} RAdam has no eps_root")
    p = [np.array(x, dtype=np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    rho_inf = 2 / (1 - b2) - 1
    traj = [[x.copy() for x in p]]
    for t in range(1, steps + 1):
        lr = _at(learning_rate, t - 1)
        grads = grad_fn(t - 1, [x.copy() for x in p])
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        rho_t = rho_inf - 2 * t * b2**t / bc2
        if convention == "optax":
            rectify = rho_t >= threshold
        elif convention == "pytorch":
            rectify = rho_t > threshold
        else:
            raise ValueError(convention)
        for i in range(len(p)):
            wd = _at(weight_decay, t - 1) if (mask is None or mask[i]) else 0.0
            g = np.asarray(grads[i], np.float64) + l2 * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / bc1
            if rectify:
                r = np.sqrt(
                    (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                )
                if convention == "optax":
                    d = r * m_hat / (np.sqrt(v[i] / bc2 + eps_root) + eps)
                else:
                    d = r * m_hat * np.sqrt(bc2) / (np.sqrt(v[i]) + eps)
            else:
                d = m_hat
            if convention == "optax":
                p[i] = p[i] - lr * (d + wd * p[i])
            else:
                p[i] = p[i] * (1 - lr * wd)
                p[i] = p[i] - lr * d
        traj.append([x.copy() for x in p])
    return _stack(traj)


def numpy_trajectory(
    opt: str, convention: str, params: Sequence[np.ndarray], grad_fn: GradFn, steps: int, **hp
) -> Trajectory:
    """The float64 NumPy transcription of ``opt`` under ``convention``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}")
    hp = _hp(opt, hp)
    family = _family(opt)
    if hp["maximize"]:
        # torch's maximize=True: the gradient is negated before everything else.
        ascent_of = grad_fn

        def grad_fn(count, params):
            return [-np.asarray(g) for g in ascent_of(count, params)]

    common = dict(
        convention=convention,
        learning_rate=hp["learning_rate"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        l2=hp["l2"],
    )
    decay = dict(weight_decay=hp["weight_decay"], mask=hp["mask"])
    if family == "adam":
        return numpy_adam(
            params,
            grad_fn,
            steps,
            amsgrad=opt in ("amsgrad", "amsgradw"),
            nesterov=hp["nesterov"],
            eps_root=hp["eps_root"],
            **common,
            **decay,
        )
    if family == "adamax":
        return numpy_adamax(params, grad_fn, steps, **common, **decay)
    if family == "nadam":
        return numpy_nadam(
            params,
            grad_fn,
            steps,
            eps_root=hp["eps_root"],
            momentum_decay=hp["momentum_decay"],
            **common,
            **decay,
        )
    return numpy_radam(
        params,
        grad_fn,
        steps,
        eps_root=hp["eps_root"],
        threshold=hp["threshold"],
        **common,
        **decay,
    )


# --------------------------------------------------------------------------------------
# 2. The frameworks themselves
# --------------------------------------------------------------------------------------


def _x64(dtype) -> contextlib.AbstractContextManager:
    import jax

    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def _dtype_of(params: Sequence[np.ndarray]) -> np.dtype:
    dtypes = {np.asarray(x).dtype for x in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise ValueError(f"one float32 or float64 dtype expected, got {dtypes}")
    return next(iter(dtypes))


def optax_optimizer(opt: str, **hp):
    """The optax optimizer that jadam's ``convention="optax"`` must reproduce."""
    import optax

    hp = _hp(opt, hp)
    lr, b1, b2, eps = hp["learning_rate"], hp["b1"], hp["b2"], hp["eps"]
    if hp["momentum_decay"] is not None:
        raise NoCounterpart("optax's NAdam has a constant momentum (no momentum_decay)")
    if hp["maximize"]:
        raise NoCounterpart("optax has no maximize")
    if opt in DECOUPLED:
        mask = hp["mask"]
        wd = dict(weight_decay=hp["weight_decay"], mask=mask)
    nesterov = dict(nesterov=True) if hp["nesterov"] else {}
    if opt == "adam":
        tx = optax.adam(lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"], **nesterov)
    elif opt == "amsgrad":
        tx = optax.amsgrad(lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"])
    elif opt == "adamw":
        tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"], **wd, **nesterov)
    elif opt == "amsgradw":
        # optax has no alias: its own layout, chain(direction, decay, -lr).
        tx = optax.chain(
            optax.scale_by_amsgrad(b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"]),
            optax.add_decayed_weights(**wd),
            optax.scale_by_learning_rate(lr),
        )
    elif opt == "adamax":
        tx = optax.adamax(lr, b1=b1, b2=b2, eps=eps)
    elif opt == "adamaxw":
        tx = optax.adamaxw(lr, b1=b1, b2=b2, eps=eps, **wd)
    elif opt == "nadam":
        tx = optax.nadam(lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"])
    elif opt == "nadamw":
        tx = optax.nadamw(lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"], **wd)
    elif opt == "radam":
        tx = optax.radam(
            lr, b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"], threshold=hp["threshold"]
        )
    elif opt == "radamw":
        tx = optax.chain(
            optax.scale_by_radam(
                b1=b1, b2=b2, eps=eps, eps_root=hp["eps_root"], threshold=hp["threshold"]
            ),
            optax.add_decayed_weights(**wd),
            optax.scale_by_learning_rate(lr),
        )
    else:
        raise ValueError(opt)
    if hp["l2"]:
        # Coupled L2: the gradient of l2/2 |p|^2 added before the moments.
        tx = optax.chain(optax.add_decayed_weights(hp["l2"]), tx)
    return tx


def optax_trajectories(
    runs: Sequence[tuple[str, dict[str, Any]]],
    params: Sequence[np.ndarray],
    grad_fn: GradFn,
    steps: int,
) -> list[Trajectory]:
    """Runs several optax optimizers ``(opt, hp)`` side by side, each on its own copy
    of ``params`` with its own state, in one jitted step: one XLA compilation for all
    of them (a compilation costs ~0.5 s here, the 100 steps a few ms).
    """
    import jax
    import optax

    dtype = _dtype_of(params)
    with _x64(dtype):
        txs = [optax_optimizer(opt, **hp) for opt, hp in runs]
        ps = [[jax.numpy.asarray(x, dtype) for x in params] for _ in txs]
        states = [tx.init(p) for tx, p in zip(txs, ps, strict=True)]

        @jax.jit
        def step(ps, states, gs):
            out_p, out_s = [], []
            for tx, p, state, g in zip(txs, ps, states, gs, strict=True):
                updates, state = tx.update(g, state, p)
                out_p.append(optax.apply_updates(p, updates))
                out_s.append(state)
            return out_p, out_s

        trajs = [[[np.asarray(x) for x in p]] for p in ps]
        for t in range(steps):
            gs = [
                [np.asarray(x, dtype) for x in grad_fn(t, [y.copy() for y in traj[-1]])]
                for traj in trajs
            ]
            ps, states = step(ps, states, gs)
            for traj, p in zip(trajs, ps, strict=True):
                traj.append([np.asarray(x) for x in p])
    out = [_stack(traj) for traj in trajs]
    assert all(x.dtype == dtype for o in out for x in o), "optax changed the parameter dtype"
    return out


def optax_trajectory(
    opt: str, params: Sequence[np.ndarray], grad_fn: GradFn, steps: int, **hp
) -> Trajectory:
    """Runs optax's own ``opt`` (jitted update, host-side gradients)."""
    return optax_trajectories([(opt, hp)], params, grad_fn, steps)[0]


@contextlib.contextmanager
def _torch_default_dtype(dtype):
    # torch keeps NAdam's mu_product (and every optimizer's step) in the default
    # dtype (optimizer._get_scalar_dtype): float32 unless the default is float64.
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if np.dtype(dtype) == np.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_trajectory(
    opt: str, params: Sequence[np.ndarray], grad_fn: GradFn, steps: int, **hp
) -> Trajectory:
    """Runs ``torch.optim`` (single-tensor code path, eager)."""
    import torch

    hp = _hp(opt, hp)
    if hp["eps_root"]:
        raise NoCounterpart("torch has no eps_root")
    if opt in ("radam", "radamw") and hp["threshold"] != TORCH_RADAM_THRESHOLD:
        raise NoCounterpart("torch.optim.RAdam hard-codes rho_t > 5")
    if hp["nesterov"]:
        raise NoCounterpart("torch.optim.Adam has no Nesterov momentum")
    dtype = _dtype_of(params)
    lr, wd = hp["learning_rate"], hp["weight_decay"]
    with _torch_default_dtype(dtype):
        tensors = [torch.tensor(np.array(x), dtype=getattr(torch, str(dtype))) for x in params]
        mask = hp["mask"] if hp["mask"] is not None else [True] * len(tensors)
        groups = [{"params": [x], "decayed": mk} for x, mk in zip(tensors, mask, strict=True)]

        def set_hyperparameters(count):
            for group in o.param_groups:
                group["lr"] = _at(lr, count)
                if opt in ("adamw", "amsgradw", "nadamw", "radamw"):
                    group["weight_decay"] = _at(wd, count) if group["decayed"] else 0.0

        betas = (hp["b1"], hp["b2"])
        common = dict(
            lr=_at(lr, 0), betas=betas, eps=hp["eps"], foreach=False, maximize=hp["maximize"]
        )
        if opt in ("adam", "amsgrad"):
            o = torch.optim.Adam(groups, weight_decay=hp["l2"], amsgrad=opt == "amsgrad", **common)
        elif opt in ("adamw", "amsgradw"):
            o = torch.optim.AdamW(groups, weight_decay=0.0, amsgrad=opt == "amsgradw", **common)
        elif opt == "adamax":
            o = torch.optim.Adamax(groups, weight_decay=hp["l2"], **common)
        elif opt == "adamaxw":
            # torch has no AdamaxW: Adamax plus AdamW's decay p <- p (1 - lr wd) before
            # each step, done below by hand (Adamax's own weight_decay is coupled L2).
            o = torch.optim.Adamax(groups, weight_decay=0.0, **common)
        elif opt in ("nadam", "nadamw"):
            psi = hp["momentum_decay"]
            o = torch.optim.NAdam(
                groups,
                weight_decay=hp["l2"] if opt == "nadam" else 0.0,
                momentum_decay=TORCH_MOMENTUM_DECAY if psi is None else psi,
                decoupled_weight_decay=opt == "nadamw",
                **common,
            )
        elif opt == "radam":
            o = torch.optim.RAdam(groups, weight_decay=hp["l2"], **common)
        elif opt == "radamw":
            o = torch.optim.RAdam(groups, weight_decay=0.0, decoupled_weight_decay=True, **common)
        else:
            raise ValueError(opt)

        traj = [[x.detach().numpy().copy() for x in tensors]]
        for t in range(steps):
            set_hyperparameters(t)
            grads = grad_fn(t, [x.copy() for x in traj[-1]])
            for x, g in zip(tensors, grads, strict=True):
                x.grad = torch.tensor(np.asarray(g), dtype=x.dtype)
            if opt == "adamaxw":
                with torch.no_grad():
                    for group in o.param_groups:
                        if group["decayed"]:
                            for x in group["params"]:
                                x.mul_(1 - group["lr"] * _at(wd, t))
            o.step()
            traj.append([x.detach().numpy().copy() for x in tensors])
    out = _stack(traj)
    assert all(x.dtype == dtype for x in out), "torch changed the parameter dtype"
    return out


@contextlib.contextmanager
def _keras_floatx(dtype):
    # Keras creates its learning-rate variable in floatx(); a float32 learning rate
    # in a float64 run would be off by ~5e-8 relative.
    import keras

    old = keras.config.floatx()
    keras.config.set_floatx(str(np.dtype(dtype)))
    try:
        yield
    finally:
        keras.config.set_floatx(old)


def _import_keras():
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise RuntimeError(f"KERAS_BACKEND={backend!r}; the parity tests need 'jax'")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError("keras was imported with another backend before the references")
    return keras


def keras_trajectory(
    opt: str, params: Sequence[np.ndarray], grad_fn: GradFn, steps: int, **hp
) -> Trajectory:
    """Runs ``keras.optimizers`` eagerly on ``keras.Variable``s (JAX backend)."""
    keras = _import_keras()
    hp = _hp(opt, hp)
    if opt in ("radam", "radamw"):
        raise NoCounterpart("Keras has no RAdam")
    if hp["nesterov"]:
        raise NoCounterpart("keras.optimizers.Adam has no Nesterov momentum")
    if hp["maximize"]:
        raise NoCounterpart("Keras has no maximize")
    if hp["eps_root"]:
        raise NoCounterpart("Keras has no eps_root")
    if hp["momentum_decay"] is not None and hp["momentum_decay"] != KERAS_MOMENTUM_DECAY:
        raise NoCounterpart("Keras' Nadam hard-codes 0.96**t")
    dtype = _dtype_of(params)
    lr, wd, l2 = hp["learning_rate"], hp["weight_decay"], hp["l2"]
    count = [0]  # the 0-based step the schedules are evaluated at
    # A no-argument callable learning rate is read by Keras at every use
    # (BaseOptimizer._get_current_learning_rate); a schedule thus stays exact float64.
    learning_rate = (lambda: _at(lr, count[0])) if callable(lr) else float(lr)
    common = dict(learning_rate=learning_rate, beta_1=hp["b1"], beta_2=hp["b2"], epsilon=hp["eps"])
    decayed = opt in DECOUPLED
    with _x64(dtype), _keras_floatx(dtype):
        variables = [
            keras.Variable(np.array(x), dtype=str(dtype), name=f"leaf{i}")
            for i, x in enumerate(params)
        ]
        wd0 = _at(wd, 0) if decayed else None
        if opt in ("adam", "amsgrad"):
            o = keras.optimizers.Adam(amsgrad=opt == "amsgrad", **common)
        elif opt in ("adamw", "amsgradw"):
            o = keras.optimizers.AdamW(weight_decay=wd0, amsgrad=opt == "amsgradw", **common)
        elif opt in ("adamax", "adamaxw"):
            o = keras.optimizers.Adamax(weight_decay=wd0, **common)
        elif opt in ("nadam", "nadamw"):
            o = keras.optimizers.Nadam(weight_decay=wd0, **common)
        else:
            raise ValueError(opt)
        if decayed and hp["mask"] is not None:
            o.exclude_from_weight_decay(
                var_list=[x for x, mk in zip(variables, hp["mask"], strict=True) if not mk]
            )
        o.build(variables)
        if not callable(lr):  # see _keras_floatx
            assert np.dtype(o.learning_rate.dtype) == dtype, o.learning_rate.dtype
        traj = [[np.array(x.value) for x in variables]]
        for t in range(steps):
            count[0] = t
            if decayed:
                o.weight_decay = _at(wd, t)
            current = [x.copy() for x in traj[-1]]
            grads = grad_fn(t, current)
            # Keras has no coupled L2: add its gradient l2 * p by hand.
            grads = [
                np.asarray(g, dtype) + (l2 * p if l2 else 0)
                for g, p in zip(grads, current, strict=True)
            ]
            o.apply([keras.ops.convert_to_tensor(np.asarray(g, dtype)) for g in grads], variables)
            traj.append([np.array(x.value) for x in variables])
    out = _stack(traj)
    assert all(x.dtype == dtype for x in out), "keras changed the parameter dtype"
    return out


FRAMEWORK_OF = {"optax": optax_trajectory, "pytorch": torch_trajectory, "keras": keras_trajectory}


def framework_trajectory(
    opt: str, convention: str, params: Sequence[np.ndarray], grad_fn: GradFn, steps: int, **hp
) -> Trajectory:
    """Runs the framework whose numbers ``convention`` must reproduce."""
    return FRAMEWORK_OF[convention](opt, params, grad_fn, steps, **hp)
