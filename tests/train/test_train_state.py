"""Models with state and randomness: dropout and batch normalization in the trainer.

Training mode in ``fit``, inference mode in ``evaluate``/``predict``/``export``;
batch statistics and RNG state in the train state and in checkpoints (resume equals
uninterrupted training); the same numbers data parallel on a mesh.

The mesh part runs this file as a script in a subprocess with 8 simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/test_train_state.py OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jadam

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the process runner
import _sharding_procs as procs  # noqa: E402

SPARSE = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def digits():
    return jadam.datasets.load("digits")


def _max_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(
        (float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
         for u, v in zip(la, lb, strict=True) if np.size(u)),
        default=0.0,
    )  # fmt: skip


def _mlp_trainer(**kw):
    return jadam.Trainer(
        jadam.MLP((64, 64, 10), dropout=0.3, batch_norm=True), "adam", loss=SPARSE,
        optimizer_options={"learning_rate": 3e-3}, **kw,
    )  # fmt: skip


# --------------------------------------------------------------------------- jadam.MLP


@pytest.mark.slow
def test_mlp_with_dropout_and_batch_norm_learns_digits(digits, tmp_path):
    t = _mlp_trainer()
    t.fit(digits.x_train, digits.y_train, epochs=15, verbose=0)
    acc = t.evaluate(digits.x_test, digits.y_test)["accuracy"]
    print(f"digits test accuracy, MLP(dropout=0.3, batch_norm=True): {acc:.4f}")
    assert acc >= 0.95
    # Inference mode: deterministic, and the running averages moved off their start.
    p1, p2 = t.predict(digits.x_test), t.predict(digits.x_test)
    np.testing.assert_array_equal(p1, p2)
    stats = t.rest["batch_stats"]["BatchNorm_0"]
    assert float(np.abs(stats["mean"]).max()) > 0.01
    assert float(np.abs(np.asarray(stats["var"]) - 1).max()) > 0.01
    # The exported program is the inference-mode model.
    t.export(tmp_path / "m.jaxexport")
    exported = jadam.load_exported(tmp_path / "m.jaxexport")
    np.testing.assert_allclose(exported(digits.x_test), p1, rtol=1e-5, atol=1e-6)


def test_training_mode_differs_from_inference_mode(digits):
    t = _mlp_trainer()
    t.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, verbose=0)
    x = digits.x_train[:64]
    params, rest = t.params, t.rest
    infer = t.adapter.apply(params, rest, x)
    key = jax.random.key(0)
    train_a, new_rest = t.adapter.apply_train(params, rest, x, key)
    train_b, _ = t.adapter.apply_train(params, rest, x, jax.random.key(1))
    assert _max_diff(infer, train_a) > 1e-3  # batch statistics and dropout in training
    assert _max_diff(train_a, train_b) > 1e-3  # another key, other dropout masks
    assert _max_diff(rest, new_rest) > 0  # training updates the running averages


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(digits, tmp_path):
    x, y = digits.x_train[:300], digits.y_train[:300]
    ref = _mlp_trainer()
    ref.fit(x, y, batch_size=32, epochs=4, verbose=0)
    part = _mlp_trainer()
    part.fit(x, y, batch_size=32, epochs=2, verbose=0)
    part.save(tmp_path / "ckpt")
    back = jadam.Trainer.load(tmp_path / "ckpt")
    assert _max_diff(back.rest, part.rest) == 0  # batch statistics are in the checkpoint
    back.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert back.step == ref.step
    assert _max_diff(back.params, ref.params) < 1e-6
    assert _max_diff(back.rest, ref.rest) < 1e-6
    np.testing.assert_allclose(back.history.history["loss"], ref.history.history["loss"],
                               rtol=1e-6)  # fmt: skip


def test_model_config_round_trip_keeps_dropout_and_batch_norm():
    m = jadam.MLP((8, 2), dropout=0.25, batch_norm=True)
    back = jadam.train.models.model_from_config(json.loads(json.dumps(m.get_config())))
    assert (back.dropout, back.batch_norm) == (0.25, True)
    plain = jadam.MLP((8, 2))
    assert plain.get_config() == {"kind": "MLP", "features": [8, 2], "activation": "relu"}


@pytest.mark.parametrize("kw, match", [
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"dropout": True}, "dropout"), ({"batch_norm": 1}, "batch_norm"),
])  # fmt: skip
def test_mlp_options_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        jadam.Trainer(jadam.MLP((4, 1), **kw)).build(np.zeros((2, 3), np.float32))


def test_plain_models_carry_no_model_state():
    t = jadam.Trainer(jadam.MLP((4, 1)))
    t.build(np.zeros((2, 3), np.float32))
    assert t.rest == {} and not t.adapter.needs_rng  # no dropout key, no mutable collections


# --------------------------------------------------------------------------- models of one's own


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool):  # Keras' name for the flag, no default
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not training)(x)
        x = nn.Dropout(0.2, deterministic=not training)(nn.relu(x))
        return nn.Dense(10)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.dense2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense2(self.drop(nnx.relu(self.norm(self.dense1(x)))))


@pytest.mark.slow
@pytest.mark.parametrize("make", [LinenNet, lambda: NnxNet(nnx.Rngs(0))], ids=["linen", "nnx"])
def test_own_models_with_dropout_and_batch_norm_train(digits, make, tmp_path):
    model = make()
    t = jadam.Trainer(model, "adam", loss=SPARSE, optimizer_options={"learning_rate": 3e-3})
    x, y = digits.x_train[:600], digits.y_train[:600]
    t.fit(x, y, epochs=6, verbose=0)
    acc = t.evaluate(digits.x_test, digits.y_test)["accuracy"]
    assert acc >= 0.85, acc
    np.testing.assert_array_equal(t.predict(digits.x_test), t.predict(digits.x_test))
    assert jax.tree.leaves(t.rest)  # batch statistics (and NNX's RNG count) are trained
    # Checkpoint round trip and a resumed epoch equal to an uninterrupted one.
    t.save(tmp_path / "ckpt")
    back = jadam.Trainer.load(tmp_path / "ckpt", model=make())
    np.testing.assert_array_equal(back.predict(digits.x_test), t.predict(digits.x_test))
    t.fit(x, y, epochs=1, verbose=0)
    back.fit(x, y, epochs=1, verbose=0)
    assert _max_diff(back.params, t.params) < 1e-6 and _max_diff(back.rest, t.rest) < 1e-6
    t.export(tmp_path / "m.jaxexport")
    exported = jadam.load_exported(tmp_path / "m.jaxexport")
    np.testing.assert_allclose(exported(digits.x_test), t.predict(digits.x_test), atol=1e-6)


def test_nnx_model_passed_in_is_not_switched_or_changed(digits):
    model = NnxNet(nnx.Rngs(0))

    def arrays(m):
        return [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype,
                jax.dtypes.prng_key) else a) for a in jax.tree.leaves(nnx.state(m))]  # fmt: skip

    before = arrays(model)
    t = jadam.Trainer(model, "adam", loss=SPARSE)
    t.fit(digits.x_train[:64], digits.y_train[:64], epochs=1, verbose=0)
    assert model.drop.deterministic is False and model.norm.use_running_average is False
    assert _max_diff(before, arrays(model)) == 0


# --------------------------------------------------------------------------- on a mesh


def _mesh_worker(out_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    ds = jadam.datasets.load("digits")
    x, y = ds.x_train[:328], ds.y_train[:328]  # 328 = 10 x 32 + 8: the last batch splits too

    def fit(**kw):
        # SGD, not Adam: the bias of a layer feeding a batch norm has a gradient of
        # exactly 0 in exact arithmetic, i.e. float32 noise that depends on the summation
        # order, and Adam's g / sqrt(v) scales that noise up to a full step.
        t = jadam.Trainer(
            jadam.MLP((64, 64, 10), dropout=0.3, batch_norm=True),
            optax.sgd(0.05, momentum=0.9), loss=SPARSE, ema=0.9, **kw,
        )  # fmt: skip
        t.fit(x, y, batch_size=32, epochs=3, verbose=0)
        return t

    ref = fit()
    res = {}
    for name, kw in {"rep": {}, "z1": {"zero1": True}}.items():
        t = fit(mesh=jadam.data_parallel_mesh(), **kw)
        res[name] = {
            "params": _max_diff(t.params, ref.params),
            "stats": _max_diff(t.rest, ref.rest),
            "predict": _max_diff(t.predict(ds.x_test), ref.predict(ds.x_test)),
        }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.slow
def test_batch_statistics_on_a_mesh_are_those_of_the_global_batch(tmp_path):
    env = procs.cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    with open(tmp_path / "result.json") as f:
        res = json.load(f)
    print(res)
    # float32, another summation order (the per-device partial sums of the batch mean
    # and of the gradient): ~1e-7 per step.
    for name in ("rep", "z1"):
        assert res[name]["params"] < 1e-5 and res[name]["stats"] < 1e-5, res
        assert res[name]["predict"] < 1e-5, res


if __name__ == "__main__":
    _mesh_worker(sys.argv[1])
