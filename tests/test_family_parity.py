"""Trajectory parity of AdaBelief, LAMB, Yogi, Adan, ADOPT, AdEMAMix and schedule-free
AdamW with optax (core and contrib), Keras and float64 NumPy transcriptions.

    pytest tests/test_family_parity.py -q

``CASES`` lists each optimizer with its conventions and variants. Every case runs
``STEPS`` steps on a small pytree of mixed shapes (with a ``None`` leaf) and compares
whole trajectories: jadam in float64 against optax (under ``jax.enable_x64``) and the
NumPy transcription to 1e-10; jadam in float32 against Keras to 1e-5 where Keras has
the optimizer. The last tests show the checks can fail: one changed term of a formula,
or one hyperparameter moved by 0.1%, moves the trajectory far beyond the tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

try:
    from . import _family_references as F
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    import _family_references as F

import jadam

STEPS = 100

SHAPES = {"w": (3, 4), "b": (5,), "s": (), "nested": [(2, 3)], "frozen": None}
_leaves, TREEDEF = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
assert len(_leaves) == 4
_rng = np.random.default_rng(20241112)
PARAMS0 = [_rng.normal(size=s) for s in _leaves]
TARGETS = [_rng.normal(size=s) for s in _leaves]
NOISE = [[_rng.normal(size=s) for s in _leaves] for _ in range(STEPS)]
# A rising and falling noise level, so that v rises and falls (Yogi's sign flips,
# ADOPT's clip binds on some steps and not on others).
AMPLITUDE = 1.0 + 0.8 * np.sin(np.arange(STEPS) / 7.0)


def grad_fn(count, params):
    """g = 0.5 (p - target) + a_t noise_t, in the parameters' dtype."""
    out = []
    for p, target, noise in zip(params, TARGETS, NOISE[count], strict=True):
        dt = p.dtype
        out.append(dt.type(0.5) * (p - target.astype(dt)) + (AMPLITUDE[count] * noise).astype(dt))
    return out


def LR_SCHEDULE(count):  # arithmetic only: exact on a Python int, traceable on an array
    return 1e-2 / (1.0 + 0.02 * count)


def WD_SCHEDULE(count):
    return 0.05 * 0.98**count


def _both(math_fn, jnp_fn):
    """A schedule that is exact float64 on a Python number and traces on an array."""
    return lambda step: math_fn(step) if isinstance(step, (int, float)) else jnp_fn(step)


# AdEMAMix's own warm-up schedules (arXiv:2409.03137, section 3), over 50 steps.
_T, _B1, _B3, _ALPHA = 50, 0.9, 0.999, 5.0
ALPHA_SCHEDULE = _both(
    F.ademamix_alpha_schedule(_ALPHA, _T), lambda s: jnp.minimum(s * _ALPHA / _T, _ALPHA)
)


def _b3_jnp(step):
    # int32 / int divides in float32 even under x64: widen the step first.
    step = jnp.asarray(step).astype(jnp.result_type(float))
    frac = jnp.minimum(step / _T, 1.0)
    lb1, lb3 = math.log(_B1), math.log(_B3)
    return jnp.minimum(jnp.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1)), _B3)


B3_SCHEDULE = _both(F.ademamix_b3_schedule(_B1, _B3, _T), _b3_jnp)

MATRICES = "matrices"  # decay only leaves with ndim >= 2
_REFERENCE_MASK = [len(s) >= 2 for s in _leaves]


def _jadam_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


# eps and eps_root are large on purpose so that each term moves the trajectory.
HP = {
    "adabelief": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-4),
    "lamb": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3, weight_decay=0.05),
    "yogi": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-2),
    "adan": dict(
        learning_rate=1e-2, b1=0.98, b2=0.92, b3=0.99, eps=1e-3, eps_root=1e-4, weight_decay=0.05
    ),
    # ADOPT's eps is a floor under sqrt(v): large enough here to bind for small entries.
    "adopt": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=0.5),
    "ademamix": dict(
        learning_rate=1e-2, b1=0.9, b2=0.99, b3=0.999, alpha=5.0, eps=1e-3, weight_decay=0.05
    ),
    "schedule_free_adamw": dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3, weight_decay=0.05),
}
# The optimizers whose jadam alias takes `convention`.
WITH_CONVENTION = ("lamb", "schedule_free_adamw")


@dataclasses.dataclass(frozen=True)
class Case:
    opt: str
    convention: str = "optax"
    variant: str = "base"
    extra: tuple[tuple[str, Any], ...] = ()
    framework: bool = True  # False: the framework cannot express it (NumPy only)

    @property
    def id(self):
        return f"{self.opt}-{self.convention}-{self.variant}"

    def hp(self, mask):
        hp = {**HP[self.opt], **dict(self.extra)}
        if hp.get("mask") == MATRICES:
            hp["mask"] = mask
        return hp

    def reference_hp(self):
        hp = self.hp(_REFERENCE_MASK)
        return {**hp, "convention": self.convention} if self.opt in WITH_CONVENTION else hp

    def jadam_hp(self):
        hp = self.hp(_jadam_mask)
        return {**hp, "convention": self.convention} if self.opt in WITH_CONVENTION else hp


def _c(opt, convention="optax", variant="base", framework=True, **extra):
    return Case(opt, convention, variant, tuple(sorted(extra.items())), framework)


SCHEDULES = dict(learning_rate=LR_SCHEDULE, weight_decay=WD_SCHEDULE)
CASES = [
    _c("adabelief"),
    _c("adabelief", variant="nesterov", nesterov=True),
    # optax.adabelief has no weight decay.
    _c("adabelief", variant="decay", framework=False, weight_decay=0.05, mask=MATRICES),
    _c("lamb"),
    _c("lamb", variant="schedules_mask", mask=MATRICES, **SCHEDULES),
    _c("lamb", "keras"),
    _c("lamb", "keras", "lr_schedule_mask", learning_rate=LR_SCHEDULE, mask=MATRICES),
    _c("yogi"),
    _c("yogi", variant="lr_schedule", learning_rate=LR_SCHEDULE),
    _c("adan"),
    _c("adan", variant="schedules_mask", mask=MATRICES, **SCHEDULES),
    # optax's decay is decoupled; the paper's proximal form has no optax counterpart.
    _c("adan", variant="proximal", framework=False, proximal=True, mask=MATRICES),
    _c("adopt"),
    _c("adopt", variant="nesterov", nesterov=True),
    _c("adopt", variant="no_clipping", use_clipping=False),
    _c("ademamix"),
    _c("ademamix", variant="paper_schedules", b3=B3_SCHEDULE, alpha=ALPHA_SCHEDULE, mask=MATRICES),
    _c("schedule_free_adamw"),
    _c("schedule_free_adamw", variant="warmup", warmup_steps=10),
    _c("schedule_free_adamw", variant="lr_schedule", learning_rate=LR_SCHEDULE,
       weight_lr_power=1.0),
    _c("schedule_free_adamw", "keras"),
    _c("schedule_free_adamw", "keras", "warmup_lr_schedule", warmup_steps=10,
       learning_rate=LR_SCHEDULE),
]  # fmt: skip
assert {c.opt for c in CASES} == set(F.OPTIMIZERS)
assert len({c.id for c in CASES}) == len(CASES)

# Per-leaf errors relative to the leaf's largest magnitude over the run (as in
# test_parity.py). float64: 1e-10, float32 against Keras: 1e-5 (~80 float32 ulps: two
# correct float32 runs drift apart by the rounding of p at each of the 100 steps).
RTOL = {"float64": 1e-10, "float32": 1e-5}


def distance(actual, expected):
    """The worst per-leaf error, relative to the leaf's scale."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        scale = float(np.max(np.abs(e)))
        err = np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)) / scale
        worst = max(worst, float(np.nan_to_num(err, nan=np.inf).max()))
    return worst


def assert_close(actual, expected, dtype, what):
    d = distance(actual, expected)
    assert d <= RTOL[dtype], f"{what}: worst relative error {d:.3g} > {RTOL[dtype]:g}"


def _run_jadam(specs, dtype):
    """jadam's trajectories for `specs` [(opt, hp)], all in one jitted step."""
    np_dtype = {"float64": np.float64, "float32": np.float32}[dtype]
    with jax.enable_x64(dtype == "float64"):
        txs = [getattr(jadam, opt)(**hp) for opt, hp in specs]
        params = [TREEDEF.unflatten([jnp.asarray(x, np_dtype) for x in PARAMS0]) for _ in txs]
        states = [tx.init(p) for tx, p in zip(txs, params, strict=True)]

        @jax.jit
        def step(params, states, grads):
            out = [
                tx.update(g, s, p) for tx, p, s, g in zip(txs, params, states, grads, strict=True)
            ]
            return [optax.apply_updates(p, u) for p, (u, _) in zip(params, out, strict=True)], [
                s for _, s in out
            ]

        trajs = [[[np.asarray(x) for x in jax.tree.leaves(p)]] for p in params]
        for t in range(STEPS):
            grads = [TREEDEF.unflatten(grad_fn(t, [x.copy() for x in tr[-1]])) for tr in trajs]
            params, states = step(params, states, grads)
            for tr, p in zip(trajs, params, strict=True):
                tr.append([np.asarray(x) for x in jax.tree.leaves(p)])
        assert step._cache_size() == 1, "the jitted step recompiled: a state dtype drifted"
        assert all(p["frozen"] is None for p in params)
    outs = [[np.stack([s[i] for s in tr]) for i in range(len(PARAMS0))] for tr in trajs]
    assert all(x.dtype == np_dtype for o in outs for x in o)
    return outs


@functools.cache
def jadam_runs(dtype):
    return dict(zip(CASES, _run_jadam([(c.opt, c.jadam_hp()) for c in CASES], dtype), strict=True))


def _params(dtype):
    return [x.astype({"float64": np.float64, "float32": np.float32}[dtype]) for x in PARAMS0]


@functools.cache
def numpy_run(case, mutation=None):
    return F.numpy_trajectory(
        case.opt, PARAMS0, grad_fn, STEPS, mutation=mutation, **case.reference_hp()
    )


@functools.cache
def optax_run(case):
    return F.optax_trajectory(case.opt, _params("float64"), grad_fn, STEPS, **case.reference_hp())


@functools.cache
def keras_run(case):
    return F.keras_trajectory(case.opt, _params("float32"), grad_fn, STEPS, **case.reference_hp())


OPTAX_CASES = [c for c in CASES if c.framework and c.convention == "optax"]
KERAS_CASES = [c for c in CASES if c.framework and c.convention == "keras"]


# optax.warmup_constant_schedule computes in float32 even under x64 (its 0.01 is
# float32(0.01), 2e-10 off): over 100 steps that moves schedule-free AdamW with a
# warmup by 4e-9 relative (measured) from any float64 run, jadam's and NumPy's alike.
OPTAX_FLOAT32_SCHEDULE = {"schedule_free_adamw-optax-warmup": 1e-8}


def assert_close_to_optax(actual, case, what):
    d = distance(actual, optax_run(case))
    rtol = OPTAX_FLOAT32_SCHEDULE.get(case.id, RTOL["float64"])
    assert d <= rtol, f"{what}: worst relative error {d:.3g} > {rtol:g}"


@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: c.id)
def test_jadam_matches_optax_float64(case):
    assert_close_to_optax(jadam_runs("float64")[case], case, f"jadam vs optax {case.id}")


@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: c.id)
def test_reference_matches_optax_float64(case):
    """The NumPy transcription reproduces optax (validates the reference itself)."""
    assert_close_to_optax(numpy_run(case), case, f"NumPy vs optax {case.id}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_jadam_matches_reference_float64(case):
    assert_close(
        jadam_runs("float64")[case], numpy_run(case), "float64", f"jadam vs NumPy {case.id}"
    )


@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: c.id)
def test_jadam_matches_keras_float32(case):
    assert_close(
        jadam_runs("float32")[case], keras_run(case), "float32", f"jadam vs Keras {case.id}"
    )


@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: c.id)
def test_reference_matches_keras_float32(case):
    assert_close(numpy_run(case), keras_run(case), "float32", f"NumPy vs Keras {case.id}")


# --- the checks can fail -----------------------------------------------------------

# One term of each formula, altered in the NumPy transcription (see its `mutation`s).
MUTATIONS = {
    "adabelief-optax-base": "no_eps_root",
    "lamb-optax-base": "no_trust_ratio",
    "yogi-optax-base": "adam_second_moment",
    "adan-optax-base": "no_nesterov_term",
    "adopt-optax-base": "current_v",
    "ademamix-optax-base": "slow_bias_corrected",
    "schedule_free_adamw-optax-lr_schedule": "current_lr_weights",
}
assert {i.split("-")[0] for i in MUTATIONS} == set(F.OPTIMIZERS)


@pytest.mark.parametrize("case_id, mutation", MUTATIONS.items())
def test_one_changed_term_breaks_parity(case_id, mutation):
    case = next(c for c in CASES if c.id == case_id)
    assert distance(numpy_run(case, mutation), jadam_runs("float64")[case]) > 1e4 * RTOL["float64"]


def test_conventions_differ():
    """Keras' LAMB and schedule-free AdamW are not optax's with the same hyperparameters."""
    for opt in WITH_CONVENTION:
        d = distance(numpy_run(Case(opt, "keras")), numpy_run(Case(opt, "optax")))
        assert d > 100 * RTOL["float32"], (opt, d)


def _perturbed():
    """Every numeric hyperparameter of each base case, moved by 0.1% (b's towards 1)."""
    for opt, hp in HP.items():
        for name, value in hp.items():
            moved = 1 - (1 - value) * 0.999 if name.startswith("b") else value * 1.001
            base = Case(opt)
            yield base, name, {**base.jadam_hp(), name: moved}


PERTURBED = list(_perturbed())


@functools.cache
def perturbed_runs():
    return _run_jadam([(c.opt, hp) for c, _, hp in PERTURBED], "float64")


@pytest.mark.parametrize(
    "index", range(len(PERTURBED)), ids=lambda i: f"{PERTURBED[i][0].opt}-{PERTURBED[i][1]}"
)
def test_every_hyperparameter_moves_the_trajectory(index):
    """Each hyperparameter plays its part: 0.1% on it is far beyond the tolerance."""
    case, _, _ = PERTURBED[index]
    assert distance(perturbed_runs()[index], jadam_runs("float64")[case]) > 100 * RTOL["float64"]
