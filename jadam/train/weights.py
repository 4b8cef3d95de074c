"""Weights in and out without pickle: safetensors files, PyTorch and Keras layouts.

A jadam weights file is a `safetensors <https://github.com/huggingface/safetensors>`_
file holding the model's trainable parameters under flat names, one per array:
``"Dense_0/kernel"``, ``"Dense_0/bias"``, ``"Dense_1/kernel"``, ... (the pytree path
joined with ``/``). Any safetensors reader opens it; nothing in it is executed.

Three layouts load into a model (``source=``):

- ``"jadam"``: the names above; every name and shape must match the model's.
- ``"torch"``: the ``state_dict`` of a PyTorch ``nn.Sequential`` of ``nn.Linear``
  layers (activations between them hold no weights), saved with
  ``safetensors.torch.save_file(model.state_dict(), path)``: keys ``"0.weight"``,
  ``"0.bias"``, ``"2.weight"``, ... The i-th ``Linear`` (in the order of its key's
  numbers) goes to the model's i-th Dense layer; its ``weight`` of shape
  ``(out, in)`` is transposed to Flax's ``kernel`` of shape ``(in, out)``.
- Keras: ``keras_model.get_weights()`` is a list ``[kernel_0, bias_0, kernel_1, ...]``
  whose kernels already have Flax's ``(in, out)`` layout; ``Trainer.set_weights`` takes
  that list as it is (``Trainer.get_weights`` gives it back).

Dense layers are the model's parameter groups holding a ``kernel`` (and optionally a
``bias``), in the natural order of their paths (``Dense_2`` before ``Dense_10``).
Mismatches (a missing or extra layer, a shape) are a ``ValueError`` naming the first
layer that does not fit. Reading checks the file's header (its size, every name,
dtype, shape and byte range, and that the ranges tile the data exactly) before any
array is allocated, and reads only a regular file (never a link, FIFO or device);
every problem with a file is a :class:`~jadam.train.checkpoint.CheckpointError`
naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadam.train.checkpoint import CheckpointError

FORMAT = "jadam-weights"
VERSION = "1"
SOURCES = ("jadam", "torch")

MAX_HEADER_BYTES = 100 << 20  # the safetensors reference reader's own limit
MAX_TENSORS = 1 << 20
MAX_RANK = 32

# safetensors dtype names -> NumPy dtypes (little-endian, as the format stores them)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip


# ---------------------------------------------------------------------------- names


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    return str(k)


def flat_names(params: Any) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` for a parameter pytree: its path joined with ``/``.

    An NNX variable's trailing ``value`` attribute is left out: ``"l/kernel"``.
    """
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [_key_name(k) for k in path]
        if (
            len(parts) > 1
            and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and parts[-1] == "value"
        ):
            parts = parts[:-1]
        out.append(("/".join(parts), leaf))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("the model's parameter paths do not give distinct names")
    return out


def _natural(name: str) -> list:
    """Sort key: numbers compare as numbers (``Dense_2`` before ``Dense_10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def dense_layers(params: Any) -> list[tuple[str, dict[str, int]]]:
    """The model's Dense layers in order: ``[(layer path, {"kernel": i, "bias": j})]``
    with the leaves' indices in ``jax.tree.leaves(params)`` order.

    ValueError for a parameter group that is not a Dense layer (e.g. batch norm's
    ``scale``): only Dense layers are mapped from other frameworks' layouts.
    """
    groups: dict[str, dict[str, int]] = {}
    for i, (name, _) in enumerate(flat_names(params)):
        layer, _, leaf = name.rpartition("/")
        groups.setdefault(layer, {})[leaf] = i
    layers = []
    for layer in sorted(groups, key=_natural):
        leaves = groups[layer]
        if "kernel" not in leaves or set(leaves) - {"kernel", "bias"}:
            raise ValueError(
                f"layer {layer or '<root>'} holds {sorted(leaves)}, not a Dense layer's kernel "
                "and bias: only models made of Dense layers load weights from other frameworks"
            )
        layers.append((layer, leaves))
    return layers


# ---------------------------------------------------------------------------- reading


def _open_regular(path: str) -> tuple[int, int]:
    """A read-only descriptor of the regular file at ``path`` and its size."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"weights file {path} is not a regular file (a link, folder, FIFO or device); "
            "refusing to read it"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced since the lstat
        os.close(fd)
        raise CheckpointError(f"weights file {path} is not a regular file; refusing to read it")
    return fd, st.st_size


def _read_exactly(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointError(f"weights file {path} is truncated: {what} ends early")
    return data


def _check_header(header: Any, data_size: int, path: str) -> list[tuple[str, np.dtype, tuple]]:
    """Entries ``(name, dtype, shape)`` in file order, after checking every field."""

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"weights file {path} is not a valid safetensors file: {msg}")

    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise bad(f"more than {MAX_TENSORS:,} tensors")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = name if len(name) <= 80 else name[:77] + "..."
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {shown!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {shown!r} has dtype {str(dtype)[:20]!r}; known: {sorted(DTYPES)}")
        if (
            not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):  # fmt: skip
            raise bad(f"tensor {shown!r} has shape {str(shape)[:60]}, not a list of sizes >= 0")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):  # fmt: skip
            raise bad(
                f"tensor {shown!r} has data_offsets {str(offsets)[:60]} outside the "
                f"{data_size:,} bytes of data"
            )
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"tensor {shown!r} of shape {tuple(shape)} {dtype} needs {nbytes:,} bytes, "
                f"its data_offsets span {offsets[1] - offsets[0]:,}"
            )
        entries.append((offsets[0], offsets[1], name, DTYPES[dtype], tuple(shape)))
    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:  # the ranges tile the data: no gap, no overlap
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin:,}, not at {end:,}")
        end = stop
    if end != data_size:
        raise bad(f"its tensors cover {end:,} bytes of data, the file holds {data_size:,}")
    return [(name, dtype, shape) for _, _, name, dtype, shape in entries]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays (by name) and the metadata of a safetensors file, validated first.

    The 8-byte header length, the JSON header and every tensor's dtype, shape and
    byte range are checked against the file's size before the data are read.
    """
    path = os.fspath(path)
    fd, size = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if size < 8:
            raise CheckpointError(
                f"weights file {path} is truncated or not a safetensors file ({size} bytes)"
            )
        (n,) = struct.unpack("<Q", _read_exactly(f, 8, path, "the header length"))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"weights file {path} declares a {n:,}-byte header, over the "
                f"{MAX_HEADER_BYTES:,} limit: not a safetensors file"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"weights file {path} is truncated: its header needs {n:,} bytes, "
                f"the file has {size - 8:,} after the length"
            )
        raw = _read_exactly(f, n, path, "the header")
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(
                f"weights file {path} is not a safetensors file: its header is not JSON "
                f"({str(e)[:100]})"
            ) from None
        entries = _check_header(header, size - 8 - n, path)
        arrays = {}
        for name, dtype, shape in entries:  # in file order: one sequential read
            count = math.prod(shape)
            buf = _read_exactly(f, count * dtype.itemsize, path, f"tensor {name!r}")
            arrays[name] = np.frombuffer(buf, dtype, count).reshape(shape).copy()
    return arrays, dict(header.get("__metadata__", {}))


# ---------------------------------------------------------------------------- writing


def write_safetensors(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file whole or not at all (a temporary sibling, then a rename).

    Refuses to replace anything but a regular file (a folder, link, FIFO or device).
    """
    from safetensors.numpy import save

    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise CheckpointError(
            f"weights path {path} exists and is not a regular file (a folder, link, FIFO or "
            "device); refusing to replace it"
        )
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write weights file {path}: folder {folder} does not exist")
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, dict(metadata))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.jadam-tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------- mapping


def _fit(name: str, got: np.ndarray, like: Any, what: str, path: str) -> np.ndarray:
    if tuple(got.shape) != tuple(like.shape):
        raise ValueError(
            f"{path}: layer {name}: {what} has shape {tuple(got.shape)}, the model's is "
            f"{tuple(like.shape)}"
        )
    if got.dtype.kind not in "fiu":
        raise ValueError(f"{path}: layer {name}: {what} has dtype {got.dtype}, not a number")
    return np.asarray(got, like.dtype)


def params_to_arrays(params: Any) -> dict[str, np.ndarray]:
    """The flat ``{name: array}`` a weights file holds for ``params`` (host arrays)."""
    return {name: np.asarray(leaf) for name, leaf in flat_names(params)}


def arrays_to_params(arrays: Mapping[str, np.ndarray], params: Any, path: str) -> Any:
    """``params`` with every leaf replaced by the array of the same name ("jadam" layout)."""
    named = flat_names(params)
    model_names = [n for n, _ in named]
    leaves = []
    for name, leaf in named:
        if name not in arrays:
            extra = sorted(set(arrays) - set(model_names), key=_natural)
            hint = f"; the file has {extra[:3]} the model lacks" if extra else ""
            hint += (
                " (a PyTorch state_dict loads with source='torch')"
                if any(k.endswith(".weight") for k in arrays)
                else ""
            )
            raise ValueError(f"{path}: the model's {name} is not in the file{hint}")
        leaves.append(_fit(name.rpartition("/")[0] or name, arrays[name], leaf,
                           name.rpartition("/")[2], path))  # fmt: skip
    extra = sorted(set(arrays) - set(model_names), key=_natural)
    if extra:
        raise ValueError(f"{path}: the file holds {extra[0]}, which the model does not have")
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


_TORCH_KEY = re.compile(r"^(.*)\.(weight|bias)$")


def torch_to_params(arrays: Mapping[str, np.ndarray], params: Any, path: str) -> Any:
    """``params`` from a PyTorch ``nn.Sequential`` of ``nn.Linear`` state_dict."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(arrays, key=_natural):
        a = arrays[key]
        m = _TORCH_KEY.match(key)
        if m is None:
            raise ValueError(
                f"{path}: key {key!r} is not a Linear layer's weight or bias: only a "
                "Sequential of Linear layers (and weightless activations) loads"
            )
        modules.setdefault(m.group(1), {})[m.group(2)] = a
    order = sorted(modules, key=_natural)
    layers = dense_layers(params)
    leaves = list(jax.tree.leaves(params))
    for i, (layer, idx) in enumerate(layers):
        if i >= len(order):
            raise ValueError(
                f"{path}: the model's layer {layer} has no counterpart: the file holds "
                f"{len(order)} Linear layers ({', '.join(order)}), the model {len(layers)}"
            )
        mod, tensors = order[i], modules[order[i]]
        where = f"{layer} (torch module {mod!r})"
        w = tensors.get("weight")
        if w is None or w.ndim != 2:
            raise ValueError(f"{path}: layer {where}: needs a 2-D weight, got {sorted(tensors)}")
        leaves[idx["kernel"]] = _fit(where, w.T, leaves[idx["kernel"]],
                                     f"weight.T (weight {tuple(w.shape)})", path)  # fmt: skip
        if ("bias" in idx) != ("bias" in tensors):
            has = "has a bias" if "bias" in idx else "has no bias"
            raise ValueError(f"{path}: layer {where}: the model's layer {has}, the file's not")
        if "bias" in idx:
            leaves[idx["bias"]] = _fit(where, tensors["bias"], leaves[idx["bias"]], "bias", path)
    if len(order) > len(layers):
        raise ValueError(
            f"{path}: the file's Linear layer {order[len(layers)]!r} has no counterpart: the "
            f"file holds {len(order)} Linear layers, the model {len(layers)}"
        )
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def list_to_params(weights: Sequence[Any], params: Any) -> Any:
    """``params`` from a Keras-ordered list ``[kernel_0, bias_0, kernel_1, ...]``."""
    if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence):
        raise TypeError(
            "set_weights takes a list of arrays [kernel_0, bias_0, kernel_1, ...] (as "
            f"keras_model.get_weights() gives), got {type(weights).__name__}"
        )
    layers = dense_layers(params)
    leaves = list(jax.tree.leaves(params))
    order = [(layer, leaf, idx[leaf]) for layer, idx in layers for leaf in ("kernel", "bias")
             if leaf in idx]  # fmt: skip
    for j, (layer, leaf, i) in enumerate(order):
        if j >= len(weights):
            raise ValueError(
                f"set_weights: the model's layer {layer} {leaf} has no counterpart: got "
                f"{len(weights)} arrays, the model has {len(order)}"
            )
        a = np.asarray(weights[j])
        leaves[i] = _fit(layer, a, leaves[i], f"array {j} ({leaf})", "set_weights")
    if len(weights) > len(order):
        raise ValueError(
            f"set_weights: got {len(weights)} arrays, the model has {len(order)} "
            f"({len(layers)} Dense layers); array {len(order)} has no counterpart"
        )
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def params_to_list(params: Any) -> list[np.ndarray]:
    """The Keras-ordered list ``[kernel_0, bias_0, kernel_1, ...]`` of ``params``."""
    leaves = jax.tree.leaves(params)
    return [np.asarray(leaves[idx[k]]) for _, idx in dense_layers(params)
            for k in ("kernel", "bias") if k in idx]  # fmt: skip


# ---------------------------------------------------------------------------- trainer


def save_weights(params: Any, path: str | os.PathLike) -> None:
    """Write ``params`` to the safetensors file ``path`` in the "jadam" layout."""
    write_safetensors(path, params_to_arrays(params), {"format": FORMAT, "version": VERSION})


def load_weights(params: Any, path: str | os.PathLike, source: str = "jadam") -> Any:
    """New parameters shaped like ``params``, read from the safetensors file ``path``."""
    if source not in SOURCES:
        raise ValueError(
            f"source must be one of {list(SOURCES)}, got {source!r} (Keras weights: "
            "trainer.set_weights(keras_model.get_weights()))"
        )
    path = os.fspath(path)
    arrays, _ = read_safetensors(path)
    if source == "torch":
        return torch_to_params(arrays, params, path)
    return arrays_to_params(arrays, params, path)
