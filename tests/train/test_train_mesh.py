"""The trainer on a mesh: 8 simulated devices, ZeRO-1, and two real processes.

Multi-device runs happen in subprocesses (this file run as a script, or the `jadam`
command), so the rest of the suite keeps its single CPU device:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/test_train_mesh.py OUT

Why the comparisons use a tolerance: on one device XLA sums a batch's gradient in
one pass; on 8 devices each device sums its own rows and an all-reduce adds the 8
partial sums. Same numbers, another float32 summation order: each step differs by a
rounding (~1e-7 relative), which Adam's normalization by sqrt(v) carries along.
After a few epochs of a small MLP this stays below 1e-5 (absolute, on parameters of
size ~0.1-1); a wrong reduction (a mean over one device's rows, a doubled gradient)
is off by orders of magnitude more. Anything that does not depend on the order
(a one-device mesh, ZeRO-1 vs replicated state) is compared exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the process runner
import _sharding_procs as procs  # noqa: E402

TOL = 1e-5  # float32, another summation order (see the module docstring)


# --------------------------------------------------------------------------- the 8-device worker


def _data(n: int):
    """16 features, 8 classes: every kernel and bias divides by 8 (for the ZeRO-1 split)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    w = rng.normal(size=(16, 8))
    return x, np.argmax(x @ w + 0.5 * rng.normal(size=(n, 8)), axis=1)


def _worker(out_dir: str) -> None:
    import jax

    import jadam

    assert jax.device_count() == 8, jax.devices()
    x, y = _data(433)
    x, y, xv, yv = x[:333], y[:333], x[333:], y[333:]
    # 333 = 10 x 32 + 13: the last batch (13 rows) cannot split over 8 (it is replicated)
    mesh = jadam.data_parallel_mesh()
    one = jadam.data_parallel_mesh(jax.devices()[:1])

    def trainer(m=None, zero1=False):
        return jadam.Trainer(
            jadam.MLP((32, 8)), "adam", loss="sparse_categorical_crossentropy",
            metrics=["accuracy"], optimizer_options={"learning_rate": 1e-2}, seed=3,
            mesh=m, zero1=zero1,
        )  # fmt: skip

    def fit(t, **kw):
        h = t.fit(x, y, batch_size=32, epochs=4, validation_data=(xv, yv), verbose=0, **kw)
        return h.history

    ref, rep, z1, solo = trainer(), trainer(mesh), trainer(mesh, zero1=True), trainer(one)
    hist = {name: fit(t) for name, t in [("ref", ref), ("rep", rep), ("z1", z1), ("solo", solo)]}
    # A second fit on the mesh in chunks of 3 steps (each chunk a call; the last carries
    # the partial batch): continues like the single-device trainer does.
    chunked = trainer(mesh, zero1=True)
    chunked.steps_per_call = 3
    hist["chunked"] = fit(chunked)
    res: dict = {"history": hist}

    def diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
            for u, v in zip(jax.tree.leaves(jadam.to_host(a)), jax.tree.leaves(jadam.to_host(b)),
                            strict=True)
        )  # fmt: skip

    res["params_rep"] = diff(ref.params, rep.params)
    res["params_z1"] = diff(ref.params, z1.params)
    res["params_z1_vs_rep"] = diff(rep.params, z1.params)
    res["opt_z1_vs_rep"] = diff(rep.state.opt_state, z1.state.opt_state)
    res["params_solo"] = diff(ref.params, solo.params)
    res["opt_solo"] = diff(ref.state.opt_state, solo.state.opt_state)
    res["params_chunked"] = diff(ref.params, chunked.params)
    res["steps"] = [t.step for t in (ref, rep, z1, chunked)]
    res["params_spec"] = [str(a.sharding.spec) for a in jax.tree.leaves(z1.params)]

    # ZeRO-1: each device's share of every moment, measured from its shards.
    moments = [a for a in jax.tree.leaves(z1.state.opt_state) if a.ndim > 0]
    res["moment_leaves"] = len(moments)
    res["moment_fractions"] = sorted(
        {s.data.nbytes / a.nbytes for a in moments for s in a.addressable_shards}
    )
    res["moment_devices"] = sorted({len({s.device for s in a.addressable_shards}) for a in moments})
    total = sum(a.nbytes for a in jax.tree.leaves(z1.state.opt_state))
    per_device = jadam.bytes_per_device(z1.state.opt_state)
    res["z1_total"], res["z1_per_device"] = total, sorted(set(per_device.values()))
    res["rep_per_device"] = sorted(set(jadam.bytes_per_device(rep.state.opt_state).values()))
    res["summary"] = z1.summary(print_fn=None).splitlines()[-2]

    # evaluate / predict on the mesh, with a batch size 8 does not divide (rounded up).
    res["eval_ref"] = ref.evaluate(xv, yv, batch_size=50)
    res["eval_z1"] = z1.evaluate(xv, yv, batch_size=50)
    res["predict"] = float(np.max(np.abs(ref.predict(xv, batch_size=30)
                                         - z1.predict(xv, batch_size=30))))  # fmt: skip
    res["predict_shape"] = list(z1.predict(xv[:7]).shape)
    try:
        z1.fit(x, y, batch_size=12, epochs=1, verbose=0)
        res["bad_batch"] = None
    except ValueError as e:
        res["bad_batch"] = str(e)

    # save / load on the mesh: the state comes back with the mesh's shardings and trains on.
    ck = os.path.join(out_dir, "ck")
    z1.save(ck)
    back = jadam.Trainer.load(ck, mesh=mesh, zero1=True)
    res["load_diff"] = diff(z1.state, back.state)
    res["load_specs_equal"] = jax.tree.leaves(
        jax.tree.map(lambda a, b: a.sharding == b.sharding, z1.state, back.state)
    ) == [True] * len(jax.tree.leaves(z1.state))
    on_one = jadam.Trainer.load(ck)  # any checkpoint loads on one device too
    res["load_one_diff"] = diff(z1.state, on_one.state)
    fit(z1), fit(back)
    res["after_load"] = diff(z1.state, back.state)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(res, f, indent=1)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh8")
    env = procs.cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=out,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    with open(out / "result.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_eight_devices_fit_like_one(eight):
    assert eight["steps"] == [44, 44, 44, 44]  # 4 epochs x (10 full + 1 partial batch)
    assert eight["params_rep"] < TOL and eight["params_z1"] < TOL
    assert eight["params_chunked"] < TOL
    h = eight["history"]
    for name in ("rep", "z1", "chunked"):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(h[name][key], h["ref"][key], rtol=1e-5, atol=1e-6)
    # ZeRO-1 changes where the moments live, not the formulas (XLA may still fuse the
    # sharded update differently: ~1 ulp); a one-device mesh is the single-device program.
    assert eight["params_z1_vs_rep"] < 1e-6 and eight["opt_z1_vs_rep"] < 1e-6
    assert eight["params_solo"] == 0 and eight["opt_solo"] == 0
    assert h["solo"] == h["ref"]
    assert set(eight["params_spec"]) == {"P()"}  # parameters replicated


@pytest.mark.slow
def test_zero1_keeps_one_eighth_of_the_optimizer_state_per_device(eight):
    assert eight["moment_leaves"] == 8  # mu and nu of 2 kernels and 2 biases
    assert eight["moment_fractions"] == [0.125] and eight["moment_devices"] == [8]
    total, (per_device,) = eight["z1_total"], eight["z1_per_device"]
    count_bytes = 8  # replicated scalars: the int32 step count and the float32 lr scale
    assert per_device == (total - count_bytes) // 8 + count_bytes
    assert eight["rep_per_device"] == [total]
    assert "per device" in eight["summary"] and "ZeRO-1" in eight["summary"]
    assert f"{per_device:,} bytes" in eight["summary"]


@pytest.mark.slow
def test_evaluate_predict_save_and_load_on_the_mesh(eight):
    for k, v in eight["eval_ref"].items():
        assert abs(eight["eval_z1"][k] - v) < 1e-5, (k, eight["eval_z1"], eight["eval_ref"])
    assert eight["predict"] < 1e-5 and eight["predict_shape"] == [7, 8]
    assert "batch_size=12" in eight["bad_batch"] and "8 devices" in eight["bad_batch"]
    assert eight["load_diff"] == 0 and eight["load_specs_equal"]
    assert eight["load_one_diff"] == 0
    assert eight["after_load"] == 0  # the restored state (and NumPy RNG) trains on identically


@pytest.mark.slow
def test_two_jadam_train_processes_match_one(tmp_path):
    common = ["--epochs", "3", "--batch-size", "32", "--layers", "16", "--seed", "2",
              "--verbose", "1"]  # fmt: skip
    env = procs.cpu_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def argv(pid, address):
        dist = ["--coordinator", address, "--num-processes", "2", "--process-id", str(pid)]
        # --zero1: the moments live split across the two processes; saving gathers them.
        return [sys.executable, "-m", "jadam.cli", "train", *common, "--out", "two", *dist,
                "--zero1"]  # fmt: skip

    two = procs.run_processes(argv, n=2, cwd=tmp_path, env=env, timeout=150)
    assert [code for code, _ in two] == [0, 0], two
    one = subprocess.run(
        [sys.executable, "-m", "jadam.cli", "train", *common, "--out", "one"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    # Process 0 printed and wrote the run folder; process 1 only trained.
    assert "cpu x 2 devices in 2 processes, ZeRO-1" in two[0][1] and "Epoch 3/3" in two[0][1]
    assert "Epoch" not in two[1][1] and "run folder" not in two[1][1]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1.keys() == m2.keys()
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-5, (m1, m2)
    import jax

    import jadam

    a = jadam.Trainer.load(tmp_path / "one" / "checkpoint")
    b = jadam.Trainer.load(tmp_path / "two" / "checkpoint")
    assert a.step == b.step > 0
    for u, v in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=TOL)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mesh_arguments_are_checked():
    import jadam

    with pytest.raises(ValueError, match="zero1=True .* mesh="):
        jadam.Trainer(jadam.MLP((1,)), zero1=True)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        jadam.Trainer(jadam.MLP((1,)), mesh="data")


@pytest.mark.parametrize(
    "args,match",
    [
        (["--coordinator", "127.0.0.1:1234"], "give all of --coordinator"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "host:port"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
        (["--distributed", "--process-id", "0"], "--distributed"),
    ],
)
def test_cli_distributed_arguments_are_checked(tmp_path, capsys, monkeypatch, args, match):
    from jadam import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--epochs", "1", *args])
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


if __name__ == "__main__":
    _worker(sys.argv[1])
