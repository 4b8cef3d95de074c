"""The newer family members work with everything the Adam family works with.

One table, ``OPTIMIZERS``, is crossed with: jit + vmap + lax.scan, grad through
``update``, ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
empty trees (``optax.masked`` all masked, ``optax.multi_transform`` unused label),
``mu_dtype``/``nu_dtype`` storages ("q8", stochastic-rounding bf16), bf16 parameters,
and hyperparameter checks at construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

# name -> (alias, its fixed keywords, the moments it stores: mu_dtype and/or nu_dtype)
OPTIMIZERS = {
    "adabelief": (jadam.adabelief, dict(weight_decay=0.01), "mu nu"),
    "lamb": (jadam.lamb, dict(weight_decay=0.01), "mu nu"),
    "lamb-keras": (jadam.lamb, dict(weight_decay=0.01, convention="keras"), "mu nu"),
    "yogi": (jadam.yogi, {}, "mu nu"),
    "adan": (jadam.adan, dict(weight_decay=0.01), "mu nu"),
    "adan-proximal": (jadam.adan, dict(weight_decay=0.01, proximal=True), "mu nu"),
    "adopt": (jadam.adopt, {}, "mu nu"),
    "ademamix": (jadam.ademamix, dict(weight_decay=0.01), "mu nu"),
    "schedule_free_adamw": (jadam.schedule_free_adamw, dict(weight_decay=0.01), "nu"),
    "schedule_free_adamw-keras": (
        jadam.schedule_free_adamw,
        dict(warmup_steps=3, weight_decay=0.01, convention="keras"),
        "nu",
    ),
}
NAMES = list(OPTIMIZERS)


def make(name, lr=1e-2, **kw):
    fn, fixed, _ = OPTIMIZERS[name]
    return fn(learning_rate=lr, **fixed, **kw)


def tree(dtype=jnp.float32):
    return {
        "w": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4),
        "b": jnp.arange(1.0, 4.0, dtype=dtype),
        "s": jnp.array(0.5, dtype),
    }


def grads_at(params, t):
    """A deterministic gradient that depends on the parameters and the step."""
    return jax.tree.map(lambda p: (p - 0.3 + 0.5 * jnp.sin(t + p)).astype(p.dtype), params)


def run(tx, params, steps):
    def body(carry, t):
        params, state = carry
        updates, state = tx.update(grads_at(params, t), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(
        body, (params, tx.init(params)), jnp.arange(steps, dtype=jnp.float32)
    )
    return params, state


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_scan_equals_separate_runs(name):
    tx = make(name)
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), tree())
    batched, _ = jax.jit(jax.vmap(lambda p: run(tx, p, 6)))(batch)
    solve = jax.jit(lambda p: run(tx, p, 6))
    for i in range(3):
        alone, _ = solve(jax.tree.map(lambda x, i=i: x[i], batch))
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], batched), alone)


@pytest.mark.parametrize("name", NAMES)
def test_second_jitted_step_does_not_recompile_and_state_dtypes_stay(name):
    tx = make(name)
    params = tree()
    state = tx.init(params)
    step = jax.jit(tx.update)
    before = jax.tree.map(lambda x: x.dtype, state)
    for t in range(3):
        _, state = step(grads_at(params, t), state, params)
    assert step._cache_size() == 1
    assert jax.tree.map(lambda x: x.dtype, state) == before


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_update_is_finite(name):
    tx = make(name)
    params = tree()

    def loss_after_steps(params):
        p, _ = run(tx, params, 3)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    g = jax.grad(loss_after_steps)(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name", NAMES)
def test_chain_with_clipping_equals_clipping_by_hand(name):
    clip = optax.clip_by_global_norm(0.5)
    chained, tx = optax.chain(clip, make(name)), make(name)
    params = tree()
    g = grads_at(params, 0.0)
    u1, _ = jax.jit(chained.update)(g, chained.init(params), params)
    clipped, _ = clip.update(g, clip.init(params))
    u2, _ = jax.jit(tx.update)(clipped, tx.init(params), params)
    assert_trees_close(u1, u2)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_the_same_trajectory(name):
    plain, _ = jax.jit(lambda p: run(make(name, lr=1e-2), p, 8))(tree())
    fn, fixed, _ = OPTIMIZERS[name]
    injected_tx = optax.inject_hyperparams(fn)(learning_rate=1e-2, **fixed)
    injected, state = jax.jit(lambda p: run(injected_tx, p, 8))(tree())
    assert_trees_close(plain, injected, rtol=2e-6)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_takes_one_step_on_the_mean_gradient(name):
    params = tree()
    g1, g2 = grads_at(params, 0.0), grads_at(params, 1.0)
    multi = optax.MultiSteps(make(name), every_k_schedule=2)
    state = multi.init(params)
    step = jax.jit(multi.update)
    u1, state = step(g1, state, params)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u1))
    u2, state = step(g2, state, params)
    tx = make(name)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = tx.update(mean, tx.init(params), params)
    assert_trees_close(u2, expected)


def unused_label(tx):
    return optax.multi_transform(
        {"used": optax.sgd(0.1), "unused": tx}, lambda p: jax.tree.map(lambda _: "used", p)
    )


def all_masked(tx):
    return optax.masked(tx, lambda p: jax.tree.map(lambda _: False, p))


@pytest.mark.parametrize("wrap", [unused_label, all_masked], ids=["unused_label", "all_masked"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_subtrees_behave_like_optax(name, wrap):
    params = tree()
    ours, theirs = wrap(make(name)), wrap(optax.adam(0.1))
    s1, s2 = ours.init(params), theirs.init(params)
    g = grads_at(params, 0.0)
    u1, _ = jax.jit(ours.update)(g, s1, params)
    u2, _ = theirs.update(g, s2, params)
    assert_trees_close(u1, u2)


@pytest.mark.parametrize("name", NAMES)
def test_empty_tree_and_none_leaves(name):
    tx = make(name)
    for params in ({}, {"a": None}, {"w": jnp.ones(2), "frozen": None}):
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(grads, state, params)
        assert jax.tree.structure(updates, is_leaf=lambda x: x is None) == jax.tree.structure(
            params, is_leaf=lambda x: x is None
        )


STORAGES = {
    "q8": jadam.Quantized(min_size=0),
    "stochastic_bf16": jadam.StochasticRounding("bfloat16"),
}


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_moments_track_float32_and_never_drift(name, storage):
    which = OPTIMIZERS[name][2].split()
    kw = {f"{m}_dtype": STORAGES[storage] for m in which}
    tx = make(name, **kw)
    params = tree()
    state0 = tx.init(params)
    step = jax.jit(lambda p, s, t: tx.update(grads_at(p, t), s, p))
    p, state = params, state0
    for t in range(10):
        u, state = step(p, state, jnp.float32(t))
        p = optax.apply_updates(p, u)
    assert step._cache_size() == 1
    assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, state0)
    reference, _ = jax.jit(lambda q: run(make(name), q, 10))(params)
    # 8-bit and bf16 moments follow the float32 run to about a percent of the step size.
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True)
    )
    err = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(reference), strict=True)
    )
    assert err < 0.1 * moved, (err, moved)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_keep_their_dtype(name):
    params, _ = jax.jit(lambda p: run(make(name), p, 3))(tree(jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


BAD = [
    (jadam.adabelief, dict(b1=1.0), "b1"),
    (jadam.adabelief, dict(eps_root=-1.0), "eps_root"),
    (jadam.adabelief, dict(weight_decay=-0.1), "weight_decay"),
    (jadam.lamb, dict(learning_rate=-1.0), "learning_rate"),
    (jadam.lamb, dict(b2=1.5), "b2"),
    (jadam.lamb, dict(convention="torch"), "convention"),
    (jadam.lamb, dict(convention="pytorch"), "pytorch"),
    (jadam.yogi, dict(eps=-1.0), "eps"),
    (jadam.yogi, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (jadam.adan, dict(b3=1.0), "b3"),
    (jadam.adan, dict(eps="x"), "eps"),
    (jadam.adopt, dict(b2=-0.1), "b2"),
    (jadam.adopt, dict(clip_value_fn="x"), "clip_value_fn"),
    (jadam.adopt, dict(clip_value_fn=-1.0), "clip_value_fn"),
    (jadam.ademamix, dict(b3=1.0), "b3"),
    (jadam.ademamix, dict(alpha=-1.0), "alpha"),
    (jadam.ademamix, dict(mu_dtype="int8"), "mu_dtype"),
    (jadam.schedule_free_adamw, dict(warmup_steps=-1), "warmup_steps"),
    (jadam.schedule_free_adamw, dict(b1=1.0), "b1"),
    (jadam.schedule_free_adamw, dict(weight_lr_power=1.0, convention="keras"), "weight_lr_power"),
    (jadam.schedule_free_adamw, dict(nu_dtype="q9"), "nu_dtype"),
    (jadam.scale_by_lamb, dict(weight_decay=0.1, convention="keras"), "learning_rate"),
]


@pytest.mark.parametrize("fn, kwargs, argument", BAD, ids=lambda x: getattr(x, "__name__", None))
def test_bad_hyperparameters_raise_naming_the_argument(fn, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        fn(**kwargs)


def test_schedules_are_accepted():
    sched = optax.linear_schedule(1e-2, 0.0, 10)
    for tx in (
        jadam.adabelief(sched, weight_decay=sched),
        jadam.lamb(sched, weight_decay=sched, convention="keras"),
        jadam.adan(sched, weight_decay=sched, proximal=True),
        jadam.ademamix(sched, b3=lambda t: 0.99, alpha=lambda t: 2.0, weight_decay=sched),
        jadam.schedule_free_adamw(sched, weight_decay=sched),
    ):
        params, _ = jax.jit(lambda p, tx=tx: run(tx, p, 3))(tree())
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_update_without_params_says_so():
    for tx in (
        jadam.lamb(),
        jadam.schedule_free_adamw(),
        jadam.adan(weight_decay=0.1, proximal=True),
    ):
        state = tx.init(tree())
        with pytest.raises(ValueError, match="params"):
            tx.update(tree(), state)


def test_schedule_free_eval_params_through_wrappers():
    params = tree()
    for tx in (
        jadam.schedule_free_adamw(0.1),
        optax.inject_hyperparams(jadam.schedule_free_adamw)(learning_rate=0.1),
        optax.chain(optax.clip(1.0), jadam.schedule_free_adamw(0.1)),
    ):
        p, state = jax.jit(lambda q, tx=tx: run(tx, q, 4))(params)
        x = jadam.schedule_free_eval_params(state, p)
        sf = next(
            s
            for s in jax.tree.leaves(
                state, is_leaf=lambda s: isinstance(s, jadam.ScheduleFreeAdamWState)
            )
            if isinstance(s, jadam.ScheduleFreeAdamWState)
        )
        # y = b1 x + (1 - b1) z, by definition of x.
        assert_trees_close(jax.tree.map(lambda xi, zi: 0.9 * xi + 0.1 * zi, x, sf.z), p, rtol=1e-5)
    with pytest.raises(ValueError, match="schedule_free_adamw"):
        jadam.schedule_free_eval_params(jadam.adam().init(params), params)
