"""Empty pytrees and `None`-only subtrees, handled the way optax handles them.

`optax.multi_transform` with a label no parameter uses and `optax.masked` with every
leaf masked off both hand the inner transformation a tree without array leaves. One
table of optimizers (every alias, every `scale_by_*` block, every storage, the
rounding and flat wrappers) is crossed with those wrappers and with empty trees
passed directly; each result is compared with `optax.adam` in the same place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

Q8_ALL = jadam.Quantized(min_size=0)  # quantize even tiny leaves
SR = jadam.StochasticRounding("bfloat16")

OPTIMIZERS = {
    "adam": lambda: jadam.adam(0.1),
    "adamw": lambda: jadam.adamw(0.1, weight_decay=0.1),
    "amsgrad": lambda: jadam.amsgrad(0.1),
    "adamax": lambda: jadam.adamax(0.1),
    "adamaxw": lambda: jadam.adamaxw(0.1),
    "nadam": lambda: jadam.nadam(0.1),
    "nadamw": lambda: jadam.nadamw(0.1),
    "nadam-pytorch": lambda: jadam.nadam(0.1, convention="pytorch"),
    "radam": lambda: jadam.radam(0.1),
    "adam-l2": lambda: jadam.adam(0.1, l2=0.1),
    "scale_by_adam": lambda: jadam.scale_by_adam(),
    "scale_by_adam-amsgrad": lambda: jadam.scale_by_adam(amsgrad=True),
    "scale_by_adam-nesterov": lambda: jadam.scale_by_adam(nesterov=True),
    "scale_by_adamax": lambda: jadam.scale_by_adamax(),
    "scale_by_nadam": lambda: jadam.scale_by_nadam(),
    "scale_by_radam": lambda: jadam.scale_by_radam(),
    "adam-bf16": lambda: jadam.adam(0.1, mu_dtype=jnp.bfloat16, nu_dtype="float16"),
    "adam-q8": lambda: jadam.adam(0.1, mu_dtype="q8", nu_dtype="q8"),
    "adam-q8-small-leaves": lambda: jadam.adam(0.1, mu_dtype=Q8_ALL, nu_dtype=Q8_ALL),
    "amsgrad-q8": lambda: jadam.amsgrad(0.1, mu_dtype=Q8_ALL, nu_dtype=Q8_ALL),
    "adam-stochastic-q8": lambda: jadam.adam(
        0.1, mu_dtype=jadam.Quantized(min_size=0, stochastic=True), nu_dtype=Q8_ALL
    ),
    "adam-stochastic-bf16": lambda: jadam.adam(0.1, mu_dtype=SR, nu_dtype=SR),
    "nadam-stochastic-bf16": lambda: jadam.nadam(0.1, mu_dtype=SR, nu_dtype=SR),
    "radam-q8": lambda: jadam.radam(0.1, mu_dtype=Q8_ALL, nu_dtype=Q8_ALL),
    "adamax-stochastic-bf16": lambda: jadam.adamax(0.1, mu_dtype=SR, nu_dtype=SR),
    "stochastic_round_updates": lambda: jadam.stochastic_round_updates(),
    "adam+stochastic_round_updates": lambda: optax.chain(
        jadam.adam(0.1), jadam.stochastic_round_updates()
    ),
    "flat-adam": lambda: jadam.flat(jadam.adam(0.1)),
    "flat-adam-q8": lambda: jadam.flat(jadam.adam(0.1, mu_dtype=Q8_ALL, nu_dtype=Q8_ALL)),
    "flat-nadam-stochastic-bf16": lambda: jadam.flat(jadam.nadam(0.1, mu_dtype=SR, nu_dtype=SR)),
}
# The rest of the family, built with their defaults.
for _name in ["adabelief", "adan", "ademamix", "adopt", "lamb", "yogi", "schedule_free_adamw"]:
    for _factory in (_name, f"scale_by_{_name}"):
        if hasattr(jadam, _factory):
            OPTIMIZERS[_factory] = getattr(jadam, _factory)
if hasattr(jadam, "lamb"):
    OPTIMIZERS["lamb-q8"] = lambda: jadam.lamb(mu_dtype=Q8_ALL, nu_dtype=Q8_ALL)
if hasattr(jadam, "cautious"):
    OPTIMIZERS["cautious-adam"] = lambda: jadam.cautious(jadam.adam(0.1))
if hasattr(jadam, "ema_params"):
    OPTIMIZERS["adam+ema_params"] = lambda: optax.chain(jadam.adam(0.1), jadam.ema_params(0.9))


def params_tree():
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}


def unused_label(tx):
    """multi_transform where the label of `tx` matches no parameter."""
    return optax.multi_transform(
        {"used": optax.sgd(0.1), "unused": tx}, lambda p: jax.tree.map(lambda _: "used", p)
    )


def all_masked(tx):
    return optax.masked(tx, lambda p: jax.tree.map(lambda _: False, p))


def half_masked(tx):
    """Only `b` goes through `tx`: a one-leaf subtree next to masked-off leaves."""
    return optax.masked(tx, lambda p: {"w": False, "b": True})


WRAPPERS = {"unused_label": unused_label, "all_masked": all_masked, "half_masked": half_masked}

EMPTY_TREES = {
    "empty_dict": {},
    "empty_tuple": (),
    "none_leaves": {"a": None, "b": [None, {"c": None}]},
    "nested_empty": {"a": {}, "b": []},
}


def steps(tx, params, grads):
    """Two updates, eager then jitted: the updates of each and the states' structures."""
    state = tx.init(params)
    structures = [jax.tree.structure(state)]
    out = []
    for update in (tx.update, jax.jit(tx.update)):
        updates, state = update(grads, state, params)
        out.append(updates)
        structures.append(jax.tree.structure(state))
    return out, structures


@functools.cache
def optax_reference(wrapper, tree=None):
    """`steps` of `optax.adam` in the same place (computed once per wrapper or tree)."""
    if tree is None:
        params = params_tree()
        return steps(WRAPPERS[wrapper](optax.adam(0.1)), params, grads_tree(params))[0]
    return steps(optax.adam(0.1), EMPTY_TREES[tree], EMPTY_TREES[tree])[0]


def grads_tree(params):
    return jax.tree.map(lambda x: (x * 0.5 + 0.25).astype(x.dtype), params)


def assert_same_updates(got, want):
    assert jax.tree.structure(got, is_leaf=lambda x: x is None) == jax.tree.structure(
        want, is_leaf=lambda x: x is None
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_wrapper_with_empty_subtree_matches_optax(name, wrapper):
    params = params_tree()
    got, structures = steps(WRAPPERS[wrapper](OPTIMIZERS[name]()), params, grads_tree(params))
    want = optax_reference(wrapper)
    for g, w in zip(got, want, strict=True):
        if wrapper == "half_masked":
            # The masked-off leaf passes through untouched, as with optax.adam.
            assert_same_updates(g["w"], w["w"])
            assert g["b"].dtype == w["b"].dtype and g["b"].shape == w["b"].shape
        else:
            assert_same_updates(g, w)
    assert len(set(structures)) == 1  # the state keeps its structure (lax.scan, cond)


@pytest.mark.parametrize("tree", sorted(EMPTY_TREES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_empty_tree_passed_directly_matches_optax(name, tree):
    params = EMPTY_TREES[tree]
    got, structures = steps(OPTIMIZERS[name](), params, params)
    for g, w in zip(got, optax_reference(None, tree), strict=True):
        assert_same_updates(g, w)
    assert len(set(structures)) == 1


@pytest.mark.parametrize("name", ["adam", "scale_by_nadam", "flat-adam-q8", "adam-q8"])
def test_none_as_the_whole_tree_matches_optax(name):
    # `params=None` means "no params" to optax, so only transforms that need none apply.
    tx = OPTIMIZERS[name]()
    updates, state = tx.update(None, tx.init(None))
    assert updates is None and optax.adam(0.1).update(None, optax.adam(0.1).init(None))[0] is None
    updates, _ = jax.jit(tx.update)(None, state)
    assert updates is None


def test_empty_tree_inside_scan():
    tx = jadam.adam(0.1, mu_dtype=Q8_ALL, nu_dtype=SR)
    state = tx.init({})

    def body(state, _):
        updates, state = tx.update({}, state, {})
        return state, updates

    state, updates = jax.lax.scan(body, state, None, length=3)
    assert updates == {}
    assert int(state[0].count) == 3


@pytest.mark.parametrize("tree", sorted(EMPTY_TREES))
def test_flat_layout_of_an_empty_tree(tree):
    params = EMPTY_TREES[tree]
    layout = jadam.flat_layout(params)
    flat = layout.ravel(params)
    assert flat == {}
    tx = jadam.adam(0.1)
    updates, _ = tx.update(flat, tx.init(flat), flat)
    assert jax.tree.structure(layout.unravel(updates), is_leaf=lambda x: x is None) == (
        jax.tree.structure(params, is_leaf=lambda x: x is None)
    )


@pytest.mark.parametrize("moments", ["float32", "q8"])
@pytest.mark.parametrize("tree", ["empty_dict", "none_leaves"])
def test_packed_adam_on_an_empty_tree(tree, moments):
    params = EMPTY_TREES[tree]
    opt = jadam.packed_adam(0.1, weight_decay=0.1, moments=moments)
    state = opt.init(params)
    state = jax.jit(opt.step)(state, params)
    state = opt.step(state, params)
    assert int(state.count) == 2
    assert state.params.shape == (0,)
    out = opt.params(state)
    assert jax.tree.structure(out, is_leaf=lambda x: x is None) == jax.tree.structure(
        params, is_leaf=lambda x: x is None
    )
