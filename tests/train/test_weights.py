"""Weights in and out without pickle: safetensors, PyTorch state_dicts, Keras lists."""

from __future__ import annotations

import json
import os
import struct

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import jadam
from jadam.train import CheckpointError

N_IN = 30


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(64, N_IN)).astype(np.float32)


def _trainer(features, x, **kw):
    # mse: predict returns the model's outputs as they are (no sigmoid)
    return jadam.Trainer(jadam.MLP(features, **kw), "adam", loss="mse", seed=1).build(x)


def _torch_mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- PyTorch


def test_torch_sequential_outputs_match(x, tmp_path):
    net = _torch_mlp([N_IN, 16, 8, 1])
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))  # keys 0.*, 2.*, 4.*
    trainer = _trainer((16, 8, 1), x)
    trainer.load_weights(path, source="torch")
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = trainer.predict(x)
    print(f"torch vs jadam max |diff| {_max_diff(got, want):.2e}")
    assert _max_diff(got, want) <= 1e-6
    np.testing.assert_array_equal(
        np.asarray(trainer.params["Dense_1"]["kernel"]), net[2].weight.detach().numpy().T
    )


def test_torch_mismatches_name_the_layer(x, tmp_path):
    trainer = _trainer((16, 8, 1), x)
    before = jax.tree.map(np.asarray, trainer.params)

    def load(net, name):
        path = tmp_path / name
        safetensors.torch.save_file(net.state_dict(), str(path))
        trainer.load_weights(path, source="torch")

    with pytest.raises(
        ValueError, match=r"layer Dense_1 \(torch module '2'\).*\(16, 12\).*\(16, 8\)"
    ):
        load(_torch_mlp([N_IN, 16, 12, 1]), "wide.safetensors")
    with pytest.raises(ValueError, match=r"layer Dense_2 has no counterpart"):
        load(_torch_mlp([N_IN, 16, 8]), "short.safetensors")
    with pytest.raises(ValueError, match=r"Linear layer '6' has no counterpart"):
        load(_torch_mlp([N_IN, 16, 8, 1, 1]), "long.safetensors")
    bn = torch.nn.Sequential(torch.nn.Linear(N_IN, 16), torch.nn.BatchNorm1d(16))
    with pytest.raises(ValueError, match=r"key '1.num_batches_tracked' is not a Linear"):
        load(bn, "bn.safetensors")
    no_bias = torch.nn.Sequential(
        torch.nn.Linear(N_IN, 16, bias=False), torch.nn.Linear(16, 8), torch.nn.Linear(8, 1)
    )
    with pytest.raises(ValueError, match=r"layer Dense_0 .*has a bias"):
        load(no_bias, "nobias.safetensors")
    # A failed load changes nothing.
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.params), strict=True):
        np.testing.assert_array_equal(u, np.asarray(v))


# --------------------------------------------------------------------------- Keras


def test_keras_weights_outputs_match(x):
    keras = pytest.importorskip("keras")
    km = keras.Sequential(
        [
            keras.Input((N_IN,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    trainer = _trainer((16, 8, 1), x)
    trainer.set_weights(km.get_weights())
    want = np.asarray(km(x))
    got = trainer.predict(x)
    print(f"keras vs jadam max |diff| {_max_diff(got, want):.2e}")
    assert _max_diff(got, want) <= 1e-6
    for a, b in zip(trainer.get_weights(), km.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # and back: jadam's weights into the Keras model
    other = _trainer((16, 8, 1), x)
    km.set_weights(other.get_weights())
    assert _max_diff(other.predict(x), np.asarray(km(x))) <= 1e-6


def test_set_weights_mismatches_name_the_layer(x):
    trainer = _trainer((16, 8, 1), x)
    w = trainer.get_weights()
    with pytest.raises(ValueError, match=r"layer Dense_1: array 2 \(kernel\) has shape \(16, 9\)"):
        trainer.set_weights([w[0], w[1], np.zeros((16, 9), np.float32), *w[3:]])
    with pytest.raises(ValueError, match=r"Dense_2 bias has no counterpart: got 5 arrays"):
        trainer.set_weights(w[:5])
    with pytest.raises(ValueError, match=r"got 7 arrays, the model has 6"):
        trainer.set_weights([*w, w[-1]])
    with pytest.raises(TypeError, match="list of arrays"):
        trainer.set_weights(w[0])


def test_many_layers_keep_their_order(x):
    # Dense_10 comes after Dense_9, not after Dense_1.
    trainer = _trainer((4,) * 11 + (1,), x)
    names = [n for n, _ in jadam.train.weights.dense_layers(trainer.params)]
    assert names == [f"Dense_{i}" for i in range(12)]
    w = trainer.get_weights()
    assert [a.shape for a in w[:2]] == [(N_IN, 4), (4,)] and w[-2].shape == (4, 1)


def test_batch_norm_models_are_refused_by_name(x):
    trainer = _trainer((16, 1), x, batch_norm=True)
    with pytest.raises(ValueError, match="BatchNorm_0"):
        trainer.get_weights()


# --------------------------------------------------------------------------- jadam files


def test_save_load_round_trip(x, tmp_path):
    y = x[:, :1] * 2.0
    trainer = _trainer((16, 1), x)
    trainer.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "w.safetensors"
    trainer.save_weights(path)
    trainer.save_weights(path)  # replaces its own file
    assert not [p for p in tmp_path.iterdir() if p.name != "w.safetensors"]  # no temporaries
    flat = safetensors.numpy.load_file(str(path))  # any safetensors reader opens it
    assert sorted(flat) == ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]

    fresh = _trainer((16, 1), x)
    assert _max_diff(fresh.predict(x), trainer.predict(x)) > 1e-3
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.predict(x), trainer.predict(x))

    with pytest.raises(
        ValueError, match=r"layer Dense_0: bias has shape \(16,\), the model's is \(8,\)"
    ):
        _trainer((8, 1), x).load_weights(path)
    with pytest.raises(ValueError, match=r"the model.s Dense_2/bias is not in the file"):
        _trainer((16, 1, 1), x).load_weights(path)
    with pytest.raises(ValueError, match=r"holds Dense_1/bias, which the model does not have"):
        _trainer((16,), x).load_weights(path)
    with pytest.raises(ValueError, match="source must be one of"):
        fresh.load_weights(path, source="keras")


def test_nnx_models_round_trip(x, tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(N_IN, 8, rngs=rngs)
            self.b = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, v):
            return self.b(nnx.relu(self.a(v)))

    def trainer(seed):
        return jadam.Trainer(Net(nnx.Rngs(seed)), "adam", loss="mse").build(x)

    src, dst = trainer(0), trainer(1)
    src.save_weights(tmp_path / "n.safetensors")
    assert sorted(safetensors.numpy.load_file(str(tmp_path / "n.safetensors"))) == [
        "a/bias", "a/kernel", "b/bias", "b/kernel",
    ]  # fmt: skip
    dst.load_weights(tmp_path / "n.safetensors")
    np.testing.assert_array_equal(dst.predict(x), src.predict(x))
    assert [a.shape for a in dst.get_weights()] == [(N_IN, 8), (8,), (8, 1), (1,)]


def test_save_refuses_what_is_not_a_file(x, tmp_path):
    trainer = _trainer((4, 1), x)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        trainer.save_weights(tmp_path / "folder")
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CheckpointError, match="not a regular file"):
        trainer.save_weights(tmp_path / "link")
    assert target.read_text() == "keep"
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.save_weights(tmp_path / "no" / "w.safetensors")


# --------------------------------------------------------------------------- hostile files


def _file(path, header: dict | bytes, data: bytes = b"", n: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
        (lambda p: _file(p, {}, n=1 << 40), "header, over the"),
        (lambda p: _file(p, {"a": _entry([4], [0, 16])}, n=4096), "truncated: its header"),
        (lambda p: _file(p, b"{not json"), "not JSON"),
        (lambda p: _file(p, b"[1, 2]"), "not a JSON object"),
        (lambda p: _file(p, {"a": _entry([4], [0, 16], "F128")}, b"\0" * 16), "dtype"),
        (lambda p: _file(p, {"a": _entry([-1], [0, 0])}), "shape"),
        (lambda p: _file(p, {"a": _entry([2**40, 2**40], [0, 16])}, b"\0" * 16), "needs"),
        (lambda p: _file(p, {"a": _entry([4], [0, 1 << 40])}, b"\0" * 16), "outside"),
        (lambda p: _file(p, {"a": _entry([4], [0, 16])}, b"\0" * 8), "outside"),
        (
            lambda p: _file(
                p, {"a": _entry([4], [0, 16]), "b": _entry([4], [8, 24])}, b"\0" * 24
            ),
            "starts at byte 8",
        ),
        (lambda p: _file(p, {"a": _entry([2], [0, 8])}, b"\0" * 16), "cover 8 bytes"),
        (lambda p: _file(p, {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly"),
        (lambda p: _file(p, {"__metadata__": {"k": 1}}), "__metadata__"),
    ],
    ids=[
        "tiny", "huge-header", "short-header", "not-json", "not-object", "dtype", "shape",
        "overflow", "offsets", "short-data", "overlap", "gap", "fields", "metadata",
    ],
)  # fmt: skip
def test_hostile_files_are_refused_by_name(x, tmp_path, make, match):
    make(tmp_path / "bad.safetensors")
    trainer = _trainer((4, 1), x)
    with pytest.raises(CheckpointError, match=match) as e:
        trainer.load_weights(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(e.value)


def test_a_truncated_real_file_is_refused(x, tmp_path):
    trainer = _trainer((16, 1), x)
    path = tmp_path / "w.safetensors"
    trainer.save_weights(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])
    with pytest.raises(CheckpointError, match="w.safetensors"):
        trainer.load_weights(path)


def test_links_fifos_and_folders_are_not_read(x, tmp_path):
    trainer = _trainer((16, 1), x)
    real = tmp_path / "real.safetensors"
    trainer.save_weights(real)
    (tmp_path / "link.safetensors").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.safetensors")  # reading it would block forever
    for name in ("link.safetensors", "fifo.safetensors", "."):
        with pytest.raises(CheckpointError, match="not a regular file"):
            trainer.load_weights(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.load_weights(tmp_path / "missing.safetensors")
