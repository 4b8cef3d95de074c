"""Scale-out: state shardings, data-parallel training on 8 simulated devices, two processes.

The layout rules run in this process on `AbstractMesh`es (no devices needed). Real
multi-device runs happen in subprocesses (tests/_sharding_worker.py), so the rest of
the suite keeps its single CPU device:

- 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`);
- two processes joined by `jax.distributed` over loopback, one CPU device each,
  exchanging data through gloo.

Why a float32 *tolerance* and not bit equality: on N devices each device sums its
rows' gradients and XLA all-reduces the N partial sums, a different summation order
from one device summing all rows. Gradients then differ in their last bits; after 12
Adam steps (each moves a weight by ~lr = 1e-2) the parameters differ by a few ulps
(measured: <= 6e-8 absolute on weights of magnitude <= 0.6). atol=1e-6 is ~15x that
margin and still ~1e-4 of one step, so a real error (a batch counted twice, a missed
all-reduce, a state shard applied to the wrong rows) fails loudly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import _sharding_procs as procs  # tests/ is on sys.path (pytest's rootdir import)
import _sharding_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_sharding_worker.py"
ATOL, RTOL = 1e-6, 1e-5  # see the module docstring

MESH8 = AbstractMesh((8,), ("data",))
MESH42 = AbstractMesh((4, 2), ("data", "model"))


def specs(tree):
    return jax.tree.map(lambda s: s.spec, tree)


PARAMS = {
    "w": jax.ShapeDtypeStruct((16, 24), jnp.float32),  # largest divisible dim: 24
    "b": jax.ShapeDtypeStruct((24,), jnp.float32),
    "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),  # nothing divides by 8
    "none": None,
}


# ---------------------------------------------------------------- layout rules


def test_moments_follow_params_and_counts_are_replicated():
    param_sh = {"w": P(None, "model"), "b": P("model"), "odd": None, "none": None}
    sh = jadam.state_shardings(jadam.adam(1e-3), PARAMS, param_sh, MESH42)
    state = jax.eval_shape(jadam.adam(1e-3).init, PARAMS)
    assert jax.tree.structure(sh) == jax.tree.structure(state)
    adam_sh = sh[0]
    assert adam_sh.count.spec == P()
    for moment in (adam_sh.mu, adam_sh.nu):
        assert specs(moment) == {"w": P(None, "model"), "b": P("model"), "odd": P(), "none": None}


def test_zero1_splits_the_largest_divisible_dimension():
    sh = jadam.state_shardings(jadam.adam(1e-3), PARAMS, mesh=MESH8, zero1_axis="data")[0]
    assert sh.count.spec == P()
    assert specs(sh.mu) == {"w": P(None, "data"), "b": P("data"), "odd": P(), "none": None}
    # ZeRO-1 on top of model sharding: the data axis joins a dimension both divide.
    param_sh = {"w": P(None, "model"), "b": P("model"), "odd": None, "none": None}
    sh = jadam.state_shardings(jadam.adam(1e-3), PARAMS, param_sh, MESH42, zero1_axis="data")[0]
    assert specs(sh.nu) == {
        "w": P("data", "model"),  # 16/4 = 4 rows beat 24/(2*4) = 3 columns
        "b": P(("model", "data")),
        "odd": P(),
        "none": None,
    }
    # Already split over the data axis: unchanged.
    sh = jadam.state_shardings(
        jadam.adam(1e-3),
        PARAMS,
        {"w": P("data"), "b": None, "odd": None, "none": None},
        MESH8,
        zero1_axis="data",
    )[0]
    assert sh.mu["w"].spec == P("data")


@pytest.mark.parametrize(
    "tx",
    [
        jadam.amsgrad(1e-3),
        jadam.nadam(1e-3),
        jadam.adamw(1e-3, weight_decay=0.1),
        optax.MultiSteps(jadam.adam(1e-3), 4),
        optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3),
        optax.chain(optax.clip_by_global_norm(1.0), jadam.radam(1e-3)),
    ],
    ids=["amsgrad", "nadam", "adamw", "multisteps", "inject", "chain"],
)
def test_every_params_shaped_subtree_is_sharded_and_the_rest_replicated(tx):
    sh = jadam.state_shardings(tx, PARAMS, mesh=MESH8, zero1_axis="data")
    state = jax.eval_shape(tx.init, PARAMS)
    assert jax.tree.structure(sh) == jax.tree.structure(state)
    for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh), strict=True):
        if leaf.shape == (16, 24):
            assert s.spec == P(None, "data")
        elif leaf.shape == (24,):
            assert s.spec == P("data")
        else:  # counts, hyperparameters, nadam's mu_product, the 3x5 leaf
            assert s.spec == P()


def test_masked_state_falls_back_to_matching_by_shape():
    tx = optax.masked(jadam.adam(1e-3), {"w": True, "b": False, "odd": True, "none": None})
    sh = jadam.state_shardings(tx, PARAMS, mesh=MESH8, zero1_axis="data")
    assert jax.tree.structure(sh) == jax.tree.structure(jax.eval_shape(tx.init, PARAMS))
    assert sh.inner_state[0].mu["w"].spec == P(None, "data")


class _Q8State(optax.ScaleByAdamState):
    pass


def _fake_q8(block: int = 4) -> optax.GradientTransformation:
    """A stand-in for quantized moments: each moment leaf is {codes, scales}."""

    def leaf(p):
        n_blocks = -(-p.size // block)
        return {
            "codes": jnp.zeros((n_blocks * block,), jnp.int8),
            "scales": jnp.zeros((n_blocks,), jnp.float32),
        }

    def init(params):
        return _Q8State(
            jnp.zeros([], jnp.int32), jax.tree.map(leaf, params), jax.tree.map(leaf, params)
        )

    return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_quantized_moment_subtrees_shard_along_their_leading_axis():
    params = {
        "w": jax.ShapeDtypeStruct((16, 8), jnp.float32),  # codes (128,), scales (32,)
        "v": jax.ShapeDtypeStruct((8, 2), jnp.float32),  # codes (16,), scales (4,)
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),  # codes (4,), scales (1,)
    }
    param_sh = {"w": P("data"), "v": P("data"), "b": None}
    sh = jadam.state_shardings(_fake_q8(), params, param_sh, MESH8)
    assert specs(sh.mu) == {
        "w": {"codes": P("data"), "scales": P("data")},
        "v": {"codes": P("data"), "scales": P()},  # 4 scales over 8 devices: replicated
        "b": {"codes": P(), "scales": P()},
    }
    # ZeRO-1 with replicated parameters: the flat codes split over the data axis.
    sh = jadam.state_shardings(_fake_q8(), params, mesh=MESH8, zero1_axis="data")
    assert specs(sh.nu) == {
        "w": {"codes": P("data"), "scales": P("data")},
        "v": {"codes": P("data"), "scales": P()},
        "b": {"codes": P(), "scales": P()},
    }


def test_param_shardings_forms_and_errors():
    mesh = jadam.data_parallel_mesh(jax.devices()[:1])
    rep = jadam.replicated(mesh)
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    tx = jadam.adam(1e-3)
    by_sharding = jadam.state_shardings(tx, params, rep)
    by_none = jadam.state_shardings(tx, params, None, mesh)
    by_tree = jadam.state_shardings(tx, params, {"w": P(), "b": rep}, mesh)
    assert by_sharding == by_none == by_tree
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(by_sharding))
    with pytest.raises(ValueError, match="mesh is required"):
        jadam.state_shardings(tx, params)
    with pytest.raises(ValueError, match="zero1_axis"):
        jadam.state_shardings(tx, params, rep, zero1_axis="batch")
    with pytest.raises(ValueError, match="param_shardings"):
        jadam.state_shardings(tx, params, {"w": rep, "c": rep})


def test_one_device_mesh_runs_the_same_step_as_plain_jit():
    mesh = jadam.data_parallel_mesh(jax.devices()[:1])
    tx = jadam.adam(1e-2)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    x = jnp.arange(24.0).reshape(8, 3) / 24.0

    def step(state, batch):
        p, s = state
        loss, g = jax.value_and_grad(lambda p: jnp.mean((batch @ p["w"].T) ** 2))(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    state_sh = (jadam.replicated(mesh), jadam.state_shardings(tx, params, mesh=mesh))
    dp = jadam.jit_data_parallel(step, mesh, state_sh)
    plain = jax.jit(step)
    a = dp(jadam.replicate((params, tx.init(params)), mesh), jadam.shard_batch(x, mesh))
    b = plain((params, tx.init(params)), x)
    np.testing.assert_array_equal(jadam.to_host(a[0][0])["w"], b[0][0]["w"])
    assert jadam.bytes_per_device(a[0][1]) == {jax.devices()[0]: 4 + 2 * 12 * 4}


def test_docstring_examples():
    import doctest

    import jadam._sharding

    assert doctest.testmod(jadam._sharding).failed == 0


# ---------------------------------------------------------------- init_distributed


@pytest.mark.parametrize(
    "args, match",
    [
        (("127.0.0.1:1234", None, None), "all of"),
        ((None, 2, 0), "all of"),
        (("127.0.0.1:1234", 0, 0), "num_processes"),
        (("127.0.0.1:1234", 2.0, 0), "num_processes"),
        (("127.0.0.1:1234", 2, 2), "process_id"),
        (("127.0.0.1:1234", 2, -1), "process_id"),
        (("127.0.0.1:1234", 2, True), "process_id"),
        (("127.0.0.1", 2, 0), "host:port"),
        (("127.0.0.1:0", 2, 0), "host:port"),
        (("127.0.0.1:70000", 2, 0), "host:port"),
        (("http://a:12", 2, 0), "host:port"),
    ],
)
def test_init_distributed_rejects_inconsistent_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        jadam.init_distributed(*args)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), True, "60"])
def test_init_distributed_rejects_a_bad_init_timeout(timeout):
    with pytest.raises(ValueError, match="init_timeout must be a positive number"):
        jadam.init_distributed("127.0.0.1:1234", 2, 0, init_timeout=timeout)


def test_init_distributed_rejects_a_bad_bind_address():
    with pytest.raises(ValueError, match="coordinator_bind_address must be 'host:port'"):
        jadam.init_distributed("127.0.0.1:1234", 2, 0, coordinator_bind_address="0.0.0.0")
    assert not jax.distributed.is_initialized()


def test_init_distributed_with_one_process_is_a_no_op():
    assert jadam.init_distributed("[::1]:1234", 1, 0) is None
    assert not jax.distributed.is_initialized()


# ---------------------------------------------------------------- 8 simulated devices


def _run(cmd, env, cwd, timeout):
    """Run, always reap; on failure show the output."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


_CHECKS_8 = """
import sys
sys.path.insert(0, {tests!r})
import _sharding_worker as w
w.main(["--out", {out!r}, "--runs", "d1,d8,d8z,sd8,sd8z,d8m,sd8mz"])
import jax, jadam, numpy as np
assert jax.device_count() == 8
mesh = jadam.data_parallel_mesh()
try:
    jadam.shard_batch(np.zeros((12, 3)), mesh)
except ValueError as e:
    print("shard_batch error:", e)
x = jadam.shard_batch(np.arange(16.0).reshape(16, 1), mesh)
print("rows per device:", sorted({{s.data.shape[0] for s in x.addressable_shards}}))
import json
print("q8:", json.dumps(w.quantized_zero1(mesh)))
"""


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eight")
    out = tmp / "r.npz"
    code = _CHECKS_8.format(tests=str(TESTS), out=str(out))
    env = procs.cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    log = _run([sys.executable, "-c", code], env, tmp, timeout=180)
    return dict(np.load(out)), log


def _assert_same_params(a, b, tag_a, tag_b):
    i = 0
    while f"{tag_a}/params/{i}" in a:
        np.testing.assert_allclose(
            b[f"{tag_b}/params/{i}"], a[f"{tag_a}/params/{i}"], rtol=RTOL, atol=ATOL
        )
        i += 1
    assert i == 6  # three Dense layers: kernel and bias each


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["d8", "d8z", "sd8", "sd8z", "d8m", "sd8mz"])
def test_eight_devices_train_like_one(eight_devices, tag):
    """d: a jitted step per batch; s: the trainer's recipe, one `lax.scan` per chunk
    over replicated data with `(steps, batch)` row indices split along dimension 1;
    m: a 4x2 ("data", "model") mesh with the layers' output features split over
    "model" (user rules); z: ZeRO-1 state."""
    r, _ = eight_devices
    _assert_same_params(r, r, "d1", tag)
    np.testing.assert_allclose(r[f"{tag}/losses"], r["d1/losses"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r[f"{tag}/moments"], r["d1/moments"], rtol=RTOL, atol=ATOL)
    assert r["d1/losses"][-1] < 0.6 * r["d1/losses"][0]  # it did learn


@pytest.mark.slow
def test_zero1_stores_one_eighth_of_the_state_per_device(eight_devices):
    r, _ = eight_devices
    total = int(r["d8z/state_total"])
    count_bytes = 4  # the int32 step count: the one leaf left replicated
    for tag in ("d8z", "sd8z", "sd8mz"):
        assert r[f"{tag}/state_bytes"].tolist() == [(total - count_bytes) // 8 + count_bytes] * 8
        assert r[f"{tag}/state_bytes"].max() <= total / 8 + count_bytes
    # Without ZeRO-1 every device holds the whole state (replicated parameters).
    for tag in ("d1", "d8", "sd8"):
        assert r[f"{tag}/state_bytes"].tolist() == [total] * (1 if tag == "d1" else 8)
    # Parameters split over "model" (2): so are their moments.
    assert r["d8m/state_bytes"].tolist() == [(total - count_bytes) // 2 + count_bytes] * 8


@pytest.mark.slow
def test_shard_batch_splits_rows_and_rejects_indivisible_batches(eight_devices):
    _, log = eight_devices
    assert "shard_batch error:" in log and "multiple of 8" in log
    assert "rows per device: [2]" in log


@pytest.mark.slow
def test_zero1_shards_quantized_moments(eight_devices):
    _, log = eight_devices
    q8 = json.loads(log.split("q8:", 1)[1].splitlines()[0])
    # Same arithmetic, only stored elsewhere: bit-identical parameters.
    assert q8["max_param_diff"] == 0.0
    total = q8["zero1_bytes_total"]
    assert q8["replicated_bytes_per_device"] == [total]
    (per_device,) = q8["zero1_bytes_per_device"]
    # Left replicated (nothing divides by 8): the count (4 bytes); "odd"'s float32 mu
    # (15 entries < min_size: 60) and 8-bit nu (15 codes + one scale: 19); "b"'s one
    # nu scale (4). Everything else, codes and scales included, is split 8 ways.
    replicated_bytes = 4 + 60 + 19 + 4
    assert per_device == (total - replicated_bytes) // 8 + replicated_bytes


# ---------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_on_loopback_train_like_one(tmp_path):
    results = procs.run_processes(
        lambda pid, address: [
            sys.executable,
            str(WORKER),
            "--out",
            str(tmp_path / f"p{pid}.npz"),
            "--runs",
            "all,allz,sallz",
            "--coordinator",
            address,
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
        ],  # fmt: skip
        n=2,
        cwd=tmp_path,
        timeout=120,
    )
    assert [code for code, _ in results] == [0, 0], "\n---\n".join(out for _, out in results)

    one = worker.train(jadam.data_parallel_mesh(jax.devices()[:1]), zero1=False)
    ref = {f"one/params/{i}": a for i, a in enumerate(one["params"])}

    for pid in range(2):
        r = dict(np.load(tmp_path / f"p{pid}.npz"))
        for tag in ("all", "allz", "sallz"):
            _assert_same_params(ref, r, "one", tag)
            np.testing.assert_allclose(r[f"{tag}/losses"], one["losses"], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(r[f"{tag}/moments"], one["moments"], rtol=RTOL, atol=ATOL)
        # Each process holds one device; ZeRO-1 halves what it stores.
        total = int(r["allz/state_total"])
        assert r["allz/state_bytes"].tolist() == [(total - 4) // 2 + 4]
        assert r["sallz/state_bytes"].tolist() == [(total - 4) // 2 + 4]
        assert r["all/state_bytes"].tolist() == [total]


def test_process_runner_kills_what_outlives_its_timeout(tmp_path):
    start = time.monotonic()
    results = procs.run_processes(
        lambda pid, address: (
            [sys.executable, "-c", f"print({pid}, {address!r}, flush=True)"]
            if pid == 0
            else [sys.executable, "-c", "import time; time.sleep(60)"]
        ),
        n=2,
        cwd=tmp_path,
        timeout=3,
    )
    assert time.monotonic() - start < 30
    (code0, out0), (code1, out1) = results
    assert code0 == 0 and out0.startswith("0 127.0.0.1:")
    assert code1 < 0 and "[killed: timed out]" in out1
