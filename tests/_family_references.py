"""Independent references for the newer Adam-family members (AdaBelief, LAMB, Yogi,
Adan, ADOPT, AdEMAMix, schedule-free AdamW), written without looking at ``jadam/``.

1. ``numpy_trajectory``: float64 NumPy transcriptions of each paper's algorithm, with
   the documented deviations of the frameworks as switches (Keras' LAMB decay, Adan's
   proximal decay, optax's and Keras' schedule-free averaging). Sources: the papers
   (arXiv:2010.07468, 1904.00962, Zaheer et al. NeurIPS 2018, 2208.06677, 2411.02853,
   2409.03137, 2405.15682), optax 0.2.8 (``optax/_src/transform.py``,
   ``optax/contrib/_{adopt,ademamix,schedule_free}.py``) and keras 3.15
   (``keras/src/optimizers/{lamb,schedule_free_adamw,base_optimizer}.py``).
2. ``optax_trajectory`` and ``keras_trajectory``: the frameworks themselves.

Runners take the optimizer name, the initial parameters (a list of arrays whose dtype
is the run's), ``grad_fn(count, params) -> grads`` (count 0 on the first step), the
number of steps and the hyperparameters under jadam's keyword names; schedules are
callables of the 0-based step. ``mask`` is a list of booleans, one per leaf. Each
returns one array per leaf of shape ``(steps + 1, *shape)``, row 0 the start.

``mutation`` (NumPy only) alters one named term of the formula, so that tests can
show the parity checks notice a single changed term.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import _references as R
except ImportError:  # tests/ is not a package
    import _references as R

_at = R._at
OPTIMIZERS = ("adabelief", "lamb", "yogi", "adan", "adopt", "ademamix", "schedule_free_adamw")


def _norm(x):
    return float(np.sqrt(np.sum(np.square(x))))


def _ratio(num, den):
    return num / den if num > 0 and den > 0 else 1.0


def numpy_trajectory(opt, params, grad_fn, steps, *, mutation=None, **hp):
    """Runs the float64 transcription of ``opt`` (see the module docstring)."""
    p = [np.array(x, np.float64) for x in params]
    state = _INIT[opt](p, hp)
    traj = [[x.copy() for x in p]]
    for t in range(1, steps + 1):
        g = [np.asarray(x, np.float64) for x in grad_fn(t - 1, [x.copy() for x in p])]
        p = _STEP[opt](t, p, g, state, hp, mutation)
        traj.append([x.copy() for x in p])
    return R._stack(traj)


def _zeros(p, n):
    return [[np.zeros_like(x) for x in p] for _ in range(n)]


def _mask(hp, n):
    return hp.get("mask") or [True] * n


# AdaBelief, Algorithm 2 of arXiv:2010.07468 (eps_root is the paper's epsilon inside s_t).
def _adabelief(t, p, g, st, hp, mut):
    m, s = st
    lr, wd = _at(hp["learning_rate"], t - 1), _at(hp.get("weight_decay", 0.0), t - 1)
    b1, b2, eps, eps_root = hp["b1"], hp["b2"], hp["eps"], hp["eps_root"]
    out = []
    for i, (x, gi, decayed) in enumerate(zip(p, g, _mask(hp, len(p)), strict=True)):
        m[i] = b1 * m[i] + (1 - b1) * gi
        s[i] = b2 * s[i] + (1 - b2) * (gi - m[i]) ** 2 + (0 if mut == "no_eps_root" else eps_root)
        if hp.get("nesterov"):
            m_hat = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * gi / (1 - b1**t)
        else:
            m_hat = m[i] / (1 - b1**t)
        s_hat = s[i] / (1 - b2**t)
        u = m_hat / (np.sqrt(s_hat) + eps)
        out.append(x - lr * (u + (wd * x if decayed else 0)))
    return out


# LAMB, Algorithm 2 of arXiv:1904.00962 with phi = identity (optax), or Keras' Lamb:
# base_optimizer._apply_weight_decay shrinks the variable, then Lamb.update_step
# rescales the undecayed Adam step by the shrunk variable's norm.
def _lamb(t, p, g, st, hp, mut):
    m, v = st
    lr, wd = _at(hp["learning_rate"], t - 1), _at(hp.get("weight_decay", 0.0), t - 1)
    b1, b2, eps, eps_root = hp["b1"], hp["b2"], hp["eps"], hp.get("eps_root", 0.0)
    out = []
    for i, (x, gi, decayed) in enumerate(zip(p, g, _mask(hp, len(p)), strict=True)):
        m[i] = b1 * m[i] + (1 - b1) * gi
        v[i] = b2 * v[i] + (1 - b2) * gi**2
        a = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t) + eps_root) + eps)
        lam = wd if decayed else 0.0
        if hp.get("convention", "optax") == "keras":
            x = x - x * lam * lr
            out.append(x - _ratio(_norm(x), _norm(a)) * lr * a)
        else:
            d = a + lam * x
            r = 1.0 if mut == "no_trust_ratio" else _ratio(_norm(x), _norm(d))
            out.append(x - lr * r * d)
    return out


# Yogi, Algorithm 2 of Zaheer et al. (NeurIPS 2018), with Adam's bias corrections and
# both moments started at initial_accumulator_value, as optax (and TF's Yogi) do.
def _yogi_init(p, hp):
    a = hp.get("initial_accumulator_value", 1e-6)
    return [[np.full_like(x, a) for x in p] for _ in range(2)]


def _yogi(t, p, g, st, hp, mut):
    m, v = st
    lr = _at(hp["learning_rate"], t - 1)
    b1, b2, eps = hp["b1"], hp["b2"], hp["eps"]
    out = []
    for i, (x, gi) in enumerate(zip(p, g, strict=True)):
        m[i] = b1 * m[i] + (1 - b1) * gi
        if mut == "adam_second_moment":
            v[i] = b2 * v[i] + (1 - b2) * gi**2
        else:
            v[i] = v[i] - (1 - b2) * np.sign(v[i] - gi**2) * gi**2
        u = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
        out.append(x - lr * u)
    return out


# Adan, Algorithm 1 of arXiv:2208.06677 (rates written as optax's b = 1 - beta), with
# the bias corrections of the authors' code and optax; g_0 = g_1 (no difference at t=1).
def _adan_init(p, hp):
    return _zeros(p, 4)  # m, v (differences), n, previous gradient


def _adan(t, p, g, st, hp, mut):
    m, v, n, prev = st
    lr, wd = _at(hp["learning_rate"], t - 1), _at(hp.get("weight_decay", 0.0), t - 1)
    b1, b2, b3, eps, eps_root = hp["b1"], hp["b2"], hp["b3"], hp["eps"], hp["eps_root"]
    out = []
    for i, (x, gi, decayed) in enumerate(zip(p, g, _mask(hp, len(p)), strict=True)):
        diff = gi - prev[i] if t > 1 else np.zeros_like(gi)
        prev[i] = gi
        m[i] = b1 * m[i] + (1 - b1) * gi
        v[i] = b2 * v[i] + (1 - b2) * diff
        k = 0.0 if mut == "no_nesterov_term" else 1 - b2
        n[i] = b3 * n[i] + (1 - b3) * (gi + k * diff) ** 2
        eta = lr / (np.sqrt(n[i] / (1 - b3**t) + eps_root) + eps)
        step = eta * (m[i] / (1 - b1**t) + k * v[i] / (1 - b2**t))
        lam = wd if decayed else 0.0
        if hp.get("proximal"):
            out.append((x - step) / (1 + lr * lam))
        else:
            out.append(x - step - lr * lam * x)
    return out


# ADOPT, Algorithm 1 of arXiv:2411.02853 with the clipped update of its section 4
# (c_t = t^(1/4) counted from the first step that moves the parameters).
def _adopt_init(p, hp):
    return _zeros(p, 2)


def _adopt(t, p, g, st, hp, mut):
    m, v = st
    lr = _at(hp["learning_rate"], t - 1)
    b1, b2, eps = hp["b1"], hp["b2"], hp["eps"]
    if t == 1:  # v_0 = g_0^2; no step
        for i, gi in enumerate(g):
            v[i] = gi**2
        return [x.copy() for x in p]
    out = []
    for i, (x, gi) in enumerate(zip(p, g, strict=True)):
        v_prev = v[i] if mut != "current_v" else b2 * v[i] + (1 - b2) * gi**2
        ng = gi / np.maximum(np.sqrt(v_prev), eps)
        if hp.get("use_clipping", True):
            c = (t - 1) ** 0.25
            ng = np.clip(ng, -c, c)
        m[i] = b1 * m[i] + (1 - b1) * ng
        u = b1 * m[i] + (1 - b1) * ng if hp.get("nesterov") else m[i]
        v[i] = b2 * v[i] + (1 - b2) * gi**2
        out.append(x - lr * u)
    return out


# AdEMAMix, Algorithm 1 of arXiv:2409.03137 (b3 and alpha may be schedules of t - 1).
def _ademamix_init(p, hp):
    return _zeros(p, 3)


def _ademamix(t, p, g, st, hp, mut):
    m1, m2, v = st
    lr, wd = _at(hp["learning_rate"], t - 1), _at(hp.get("weight_decay", 0.0), t - 1)
    b1, b2, eps, eps_root = hp["b1"], hp["b2"], hp["eps"], hp.get("eps_root", 0.0)
    b3, alpha = _at(hp["b3"], t - 1), _at(hp["alpha"], t - 1)
    out = []
    for i, (x, gi, decayed) in enumerate(zip(p, g, _mask(hp, len(p)), strict=True)):
        m1[i] = b1 * m1[i] + (1 - b1) * gi
        m2[i] = b3 * m2[i] + (1 - b3) * gi
        v[i] = b2 * v[i] + (1 - b2) * gi**2
        slow = m2[i] / (1 - b3**t) if mut == "slow_bias_corrected" else m2[i]
        u = (m1[i] / (1 - b1**t) + alpha * slow) / (np.sqrt(v[i] / (1 - b2**t) + eps_root) + eps)
        out.append(x - lr * (u + (wd * x if decayed else 0)))
    return out


def ademamix_alpha_schedule(alpha, warmup):
    """The paper's alpha scheduler: a linear warmup over `warmup` steps."""
    return lambda step: min(step * alpha / warmup, alpha)


def ademamix_b3_schedule(b1, b3, warmup):
    """The paper's b3 scheduler: b3 warms up so that the EMA's half-life grows linearly."""

    def schedule(step):
        frac = min(step / warmup, 1.0)
        lb1, lb3 = math.log(b1), math.log(b3)
        return min(math.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1)), b3)

    return schedule


# Schedule-free AdamW, Algorithm 1 of arXiv:2405.15682, kept in its (x, z) form:
# y = b1 x + (1 - b1) z is where gradients are taken.
def _sf_init(p, hp):
    return {"x": [x.copy() for x in p], "z": [x.copy() for x in p], "v": _zeros(p, 1)[0],
            "max_lr": 0.0, "weight_sum": 0.0}  # fmt: skip


def _sf(t, y, g, st, hp, mut):
    b1, b2, eps = hp["b1"], hp["b2"], hp["eps"]
    warm = hp.get("warmup_steps") or 0
    keras = hp.get("convention", "optax") == "keras"
    base = _at(hp["learning_rate"], t - 1)
    wd = _at(hp.get("weight_decay", 0.0), t - 1)
    if keras:
        lr = base * (min(t / warm, 1.0) if warm else 1.0)
        c = 1.0 / t
    else:
        # optax: the step uses the schedule at t - 1, the weights the one at t.
        lr = base * (min((t - 1) / warm, 1.0) if warm else 1.0)
        ahead = _at(hp["learning_rate"], t) * (min(t / warm, 1.0) if warm else 1.0)
        st["max_lr"] = max(st["max_lr"], ahead)
        w = st["max_lr"] ** hp.get("weight_lr_power", 2.0)
        if mut == "current_lr_weights":
            w = ahead ** hp.get("weight_lr_power", 2.0)
        st["weight_sum"] += w
        c = w / st["weight_sum"] if st["weight_sum"] > 0 else 0.0
    out = []
    for i, (yi, gi) in enumerate(zip(y, g, strict=True)):
        st["v"][i] = b2 * st["v"][i] + (1 - b2) * gi**2
        step = gi / (np.sqrt(st["v"][i] / (1 - b2**t)) + eps)
        if keras:
            # Keras shrinks y, then recovers x from the shrunk y and the old z.
            yi = yi - yi * wd * base
            st["x"][i] = (yi - (1 - b1) * st["z"][i]) / b1
        else:
            step = step + wd * yi
        st["z"][i] = st["z"][i] - lr * step
        st["x"][i] = (1 - c) * st["x"][i] + c * st["z"][i]
        out.append(b1 * st["x"][i] + (1 - b1) * st["z"][i])
    return out


def _moments(n):
    return lambda p, hp: _zeros(p, n)


_INIT = {
    "adabelief": _moments(2),
    "lamb": _moments(2),
    "yogi": _yogi_init,
    "adan": _adan_init,
    "adopt": _adopt_init,
    "ademamix": _ademamix_init,
    "schedule_free_adamw": _sf_init,
}
_STEP = {
    "adabelief": _adabelief,
    "lamb": _lamb,
    "yogi": _yogi,
    "adan": _adan,
    "adopt": _adopt,
    "ademamix": _ademamix,
    "schedule_free_adamw": _sf,
}


# --------------------------------------------------------------------------------------
# The frameworks
# --------------------------------------------------------------------------------------


def optax_optimizer(opt, hp):
    import optax
    import optax.contrib

    hp = dict(hp)
    hp.pop("convention", None)
    if opt == "adabelief":
        return optax.adabelief(**hp)
    if opt == "lamb":
        return optax.lamb(**hp)
    if opt == "yogi":
        return optax.yogi(**hp)
    if opt == "adan":
        return optax.adan(**hp)
    if opt == "adopt":
        return optax.contrib.adopt(**hp)
    if opt == "ademamix":
        return optax.contrib.ademamix(**hp)
    if opt == "schedule_free_adamw":
        return optax.contrib.schedule_free_adamw(**hp)
    raise ValueError(opt)


def optax_trajectory(opt, params, grad_fn, steps, **hp):
    """Runs optax's own optimizer on the list of leaves (jitted update)."""
    import jax
    import optax

    dtype = R._dtype_of(params)
    with R._x64(dtype):
        tx = optax_optimizer(opt, hp)
        p = [jax.numpy.asarray(x, dtype) for x in params]
        state = tx.init(p)

        @jax.jit
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optax.apply_updates(p, updates), state

        traj = [[np.asarray(x) for x in p]]
        for t in range(steps):
            g = [np.asarray(x, dtype) for x in grad_fn(t, [y.copy() for y in traj[-1]])]
            p, state = step(p, state, g)
            traj.append([np.asarray(x) for x in p])
    return R._stack(traj)


def keras_trajectory(opt, params, grad_fn, steps, **hp):
    """Runs ``keras.optimizers.Lamb`` or ``ScheduleFreeAdamW`` eagerly (JAX backend)."""
    keras = R._import_keras()
    dtype = R._dtype_of(params)
    lr, wd = hp["learning_rate"], hp.get("weight_decay", 0.0)
    count = [0]
    learning_rate = (lambda: _at(lr, count[0])) if callable(lr) else float(lr)
    common = dict(learning_rate=learning_rate, beta_1=hp["b1"], beta_2=hp["b2"], epsilon=hp["eps"])
    with R._x64(dtype), R._keras_floatx(dtype):
        variables = [
            keras.Variable(np.array(x), dtype=str(dtype), name=f"leaf{i}")
            for i, x in enumerate(params)
        ]
        wd0 = _at(wd, 0) or None
        if opt == "lamb":
            o = keras.optimizers.Lamb(weight_decay=wd0, **common)
        elif opt == "schedule_free_adamw":
            warm = hp.get("warmup_steps") or 0
            o = keras.optimizers.ScheduleFreeAdamW(weight_decay=wd0, warmup_steps=warm, **common)
        else:
            raise R.NoCounterpart(f"Keras has no {opt}")
        if hp.get("mask") is not None:
            o.exclude_from_weight_decay(
                var_list=[x for x, mk in zip(variables, hp["mask"], strict=True) if not mk]
            )
        o.build(variables)
        traj = [[np.array(x.value) for x in variables]]
        for t in range(steps):
            count[0] = t
            if wd0 is not None:
                o.weight_decay = _at(wd, t)
            grads = grad_fn(t, [x.copy() for x in traj[-1]])
            o.apply([keras.ops.convert_to_tensor(np.asarray(g, dtype)) for g in grads], variables)
            traj.append([np.array(x.value) for x in variables])
    return R._stack(traj)
