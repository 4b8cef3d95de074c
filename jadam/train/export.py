"""Exported models: the prediction function as serialized StableHLO (``jax.export``).

``Trainer.export(path)`` writes ``path`` (the serialized program) and ``path.json``
(the sidecar: format marker, version, input and output shapes, loss, platforms,
user metadata, and a SHA-256 over the program's bytes and the sidecar's own fields).

An exported model is code: loading deserializes a compiled program and calling it
runs that program, much as ``torch.load`` of an untrusted file is unsafe. Load only
exports from a source you trust. The checksum and the shape checks catch damaged or
mismatched files, not a deliberate forgery: anyone can recompute a checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from typing import Any

import jax
import numpy as np

from jadam._sharding import to_host
from jadam.train import inputs
from jadam.train.checkpoint import CheckpointError, jadam_version, read_json

EXPORT_FORMAT = "jadam-export"
VERSION = 2  # 2: the SHA-256 covers the sidecar's fields too
MAX_SIDECAR_BYTES = 4 << 20
MAX_EXPORT_BYTES = 16 << 30

_OUTPUTS = {"binary": "probability", "categorical": "probabilities",
            "sparse": "probabilities", "regression": "values"}  # fmt: skip


def _checksum(blob: bytes, sidecar: dict) -> str:
    """SHA-256 of the program's bytes and of every sidecar field except the checksum."""
    fields = {k: v for k, v in sidecar.items() if k != "sha256"}
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(hashlib.sha256(blob).digest() + canon).hexdigest()


def export_trainer(trainer, path: str, platforms=None, metadata: dict | None = None) -> None:
    """Write ``trainer``'s prediction function at ``path`` and its sidecar ``path.json``."""
    from jax import export  # jax.export needs flatbuffers: only loaded when exporting

    # Whole host copies: the exported function closes over constants, never over
    # arrays placed on a mesh (or on another process's devices).
    # Inference mode; the averaged weights under Trainer(ema=).
    params, rest = to_host((trainer.inference_params, trainer.rest))
    adapter, link = trainer.adapter, trainer.loss.link

    def infer(x):
        return link(adapter.apply(params, rest, x))

    (b,) = export.symbolic_shape("batch")  # any batch size at call time
    exp = export.export(jax.jit(infer), platforms=platforms)(inputs.abstract(trainer.input_spec, b))
    blob = bytes(exp.serialize())
    sidecar = {
        "format": EXPORT_FORMAT,
        "version": VERSION,
        "jadam_version": jadam_version(),
        "input_spec": trainer.input_spec,
        "output_shape": list(trainer.output_shape),
        "loss": trainer.loss.name,
        "outputs": _OUTPUTS[trainer.loss.task],
        "platforms": list(exp.platforms),
        "metadata": metadata or {},
    }
    sidecar["sha256"] = _checksum(blob, sidecar)
    text = json.dumps(sidecar, indent=1)  # fails here, before anything is written
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp_blob, tmp_json = f"{path}.jadam-tmp-{tag}", f"{path}.json.jadam-tmp-{tag}"
    try:
        with open(tmp_blob, "wb") as f:
            f.write(blob)
        with open(tmp_json, "w") as f:
            f.write(text)
        # The sidecar first: a program next to an older sidecar fails its checksum.
        os.replace(tmp_json, path + ".json")
        os.replace(tmp_blob, path)
    finally:
        for t in (tmp_blob, tmp_json):
            if os.path.lexists(t):
                os.remove(t)


class ExportedModel:
    """A deserialized exported model: call it with inputs shaped like the training data.

    It runs a compiled program read from disk: only load exports you trust.
    """

    def __init__(self, exported, sidecar: dict):
        self._exported = exported
        self.sidecar = sidecar
        self.input_spec = sidecar["input_spec"]
        self.output_shape = tuple(sidecar["output_shape"])
        self.metadata = sidecar.get("metadata", {})

    def __call__(self, x: Any) -> np.ndarray:
        x = inputs.to_tree(x, "x")
        inputs.length(x, "x")
        if inputs.spec(x) != self.input_spec:
            raise ValueError(
                f"inputs {inputs.spec(x)} do not match the exported model's {self.input_spec}"
            )
        return np.asarray(self._exported.call(x))

    def __repr__(self) -> str:
        return f"ExportedModel(inputs={self.input_spec}, outputs={self.output_shape})"


def _check_sidecar(sidecar: dict, where: str) -> None:
    if sidecar.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{where} is not a jadam export sidecar")
    if sidecar.get("version") not in (1, VERSION):
        raise CheckpointError(
            f"{where}: unknown export version {str(sidecar.get('version'))[:20]!r}"
        )
    try:
        inputs.check_spec(sidecar.get("input_spec"), "input_spec")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    out = sidecar.get("output_shape")
    if not isinstance(out, list) or not all(type(d) is int and d >= 0 for d in out):
        raise CheckpointError(f"{where}: output_shape must be a list of integers >= 0")
    if not isinstance(sidecar.get("metadata", {}), dict):
        raise CheckpointError(f"{where}: metadata must be a JSON object")


def _check_program(exported, sidecar: dict, where: str) -> None:
    """The deserialized program must take and give what the sidecar declares."""
    expected = inputs.abstract(sidecar["input_spec"], 1)
    leaves, tree = jax.tree.flatten(((expected,), {}))
    got = [(tuple(a.shape[1:]), str(a.dtype), len(a.shape)) for a in exported.in_avals]
    want = [(tuple(s.shape[1:]), str(s.dtype), len(s.shape)) for s in leaves]
    if exported.in_tree != tree or got != want:
        raise CheckpointError(
            f"{where} declares inputs {sidecar['input_spec']}, but the program takes "
            f"{[f'{d}{list(s)}' for s, d, _ in got]}: the export is damaged or mismatched"
        )
    outs = exported.out_avals
    if len(outs) != 1 or list(outs[0].shape[1:]) != sidecar["output_shape"]:
        raise CheckpointError(
            f"{where} declares outputs {sidecar['output_shape']}, but the program gives "
            f"{[list(a.shape[1:]) for a in outs]}: the export is damaged or mismatched"
        )


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load a model written by ``Trainer.export``; runs without the model's Python code.

    The file holds a serialized StableHLO program (no pickle). **An exported model is
    code: load only exports from a source you trust.** Before anything runs, the
    SHA-256 over the program and its sidecar ``<path>.json`` is checked, and the
    program's input and output shapes must be those the sidecar declares;
    `CheckpointError` otherwise.
    """
    from jax import export

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no exported model at {path}")
    sidecar = read_json(path + ".json", "exported model sidecar", MAX_SIDECAR_BYTES)
    _check_sidecar(sidecar, path + ".json")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"exported model {path} is not a regular file; refusing to read it")
    if st.st_size > MAX_EXPORT_BYTES:
        raise CheckpointError(f"exported model {path} is over the {MAX_EXPORT_BYTES:,}-byte limit")
    with open(path, "rb") as f:
        blob = f.read()
    if sidecar["version"] == 1:  # older exports: the checksum covers the program only
        ok = hashlib.sha256(blob).hexdigest() == sidecar.get("sha256")
    else:
        ok = _checksum(blob, sidecar) == sidecar.get("sha256")
    if not ok:
        raise CheckpointError(f"exported model {path} is corrupt: SHA-256 mismatch")
    try:
        exported = export.deserialize(bytearray(blob))
    except Exception as e:
        raise CheckpointError(
            f"exported model {path} cannot be deserialized: {str(e)[:300]}"
        ) from None
    _check_program(exported, sidecar, path + ".json")
    return ExportedModel(exported, sidecar)
