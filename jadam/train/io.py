"""Checkpoints (orbax) and exported models (``jax.export``). No pickle anywhere.

A checkpoint folder holds:

- ``state/``: the arrays (parameters, optimizer state, step, RNG key), saved by orbax
  under plain keys ``a0000, a0001, ...``;
- ``manifest.json``: for each key, the pytree path, shape, dtype and the SHA-256 of
  the array's bytes. orbax does not checksum array data (a garbled file restores
  silently), so jadam verifies every array on load;
- ``config.json``: everything needed to rebuild the trainer as plain JSON (model
  config, loss, metrics, optimizer name and options, input shapes, NumPy shuffling
  RNG state, epochs done). Option values JSON has no type for (dtypes, jadam's
  moment storages) are tagged dicts (``encode_options``); a schedule or function is
  recorded by type only, and loading asks for the optimizer;
- ``history.json``.

Everything is written into a temporary sibling folder and renamed into place, so an
interrupted save never leaves a half-written checkpoint.

With several processes (``jax.distributed``), every process takes part in a save: a
sharded state (ZeRO-1 moments) is gathered to whole arrays (a collective), process 0
alone writes the folder (orbax restricted to process 0), and all processes meet at a
barrier afterwards, so none returns before the checkpoint is complete. A checkpoint
holds whole arrays, not shards: any mesh, or one device, restores any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadam._sharding import to_host

FORMAT = "jadam-checkpoint"
EXPORT_FORMAT = "jadam-export"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or exported model is missing, corrupt or does not fit the model."""


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _jadam_version() -> str:
    import jadam

    return getattr(jadam, "__version__", "unknown")


def _flat_state(state: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state._asdict())
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves]


def atomic_dir(final: str, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary sibling folder, then swap it into place.

    An existing ``final`` is replaced only after the new folder is complete.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        write(tmp)
        if os.path.lexists(final):
            old = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checkpointer():
    """orbax's checkpointer; with several processes, one that involves process 0 only
    (the arrays it gets are whole NumPy arrays, identical on every process)."""
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.PyTreeCheckpointer(use_compression=False)
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=mp)
    return ocp.Checkpointer(handler, multiprocessing_options=mp)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_trainer(trainer, directory: str) -> None:
    import orbax.checkpoint as ocp

    items = _flat_state(to_host(trainer.state))  # a collective when the state is sharded
    if jax.process_index() != 0:
        _barrier("jadam save_trainer")  # process 0 writes; wait until it is done
        return
    try:
        _write_checkpoint(trainer, directory, items, ocp)
    finally:
        _barrier("jadam save_trainer")


def _write_checkpoint(trainer, directory: str, items, ocp) -> None:
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            raise CheckpointError(
                f"{directory} exists and is not a jadam checkpoint; refusing to overwrite it"
            )
    arrays = {f"a{i:04d}": np.asarray(leaf) for i, (_, leaf) in enumerate(items)}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "arrays": [
            {
                "key": k,
                "path": p,
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "sha256": _sha256(a),
            }
            for (k, a), (p, _) in zip(arrays.items(), items, strict=True)
        ],
    }
    adapter = trainer.adapter
    model_cfg = adapter.config or {
        "kind": "custom",
        "flax": adapter.kind,
        "class": f"{type(adapter.model).__module__}.{type(adapter.model).__qualname__}",
    }
    config = {
        "format": FORMAT,
        "version": VERSION,
        "jadam_version": _jadam_version(),
        "model": model_cfg,
        "loss": trainer.loss.name,
        "metrics": [m.name for m in trainer.metric_objs],
        "optimizer": {
            "name": trainer.optimizer_config["name"],
            "options": encode_options(trainer.optimizer_config["options"]),
        },
        "l1": trainer.l1,
        "l2": trainer.l2,
        "seed": trainer.seed,
        "steps_per_call": trainer.steps_per_call,
        "input_spec": trainer.input_spec,
        "output_shape": list(trainer.output_shape),
        "epochs_done": trainer.epochs_done,
        "numpy_rng": trainer.np_rng.bit_generator.state,  # plain ints and strings
    }

    def write(tmp: str) -> None:
        # No compression: array bytes are stored as is (and verified by the manifest).
        ckptr = _checkpointer()
        if jax.process_count() == 1:
            ckptr.save(os.path.join(tmp, "state"), arrays)
        else:
            ckptr.save(os.path.join(tmp, "state"), args=ocp.args.PyTreeSave(arrays))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        trainer.history.save(os.path.join(tmp, "history.json"))

    atomic_dir(directory, write)


_TAG = "__jadam__"  # marks an option value that JSON has no type for


def encode_options(options: dict) -> dict:
    """Optimizer options as JSON. Numbers, strings, booleans and dicts of them stay as
    they are; dtypes and jadam's moment storages (`StochasticRounding`, `Quantized`)
    are tagged so `decode_options` rebuilds them; anything else (a schedule, a mask
    function) is recorded by type only, and loading then asks for the optimizer."""
    return {str(k): _encode(v) for k, v in options.items()}


def _encode(value: Any) -> Any:
    from jadam._quantize import Quantized
    from jadam._rounding import StochasticRounding

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, StochasticRounding):
        dtype = jnp.dtype(value.dtype).name
        return {_TAG: "StochasticRounding", "dtype": dtype, "seed": value.seed}
    if isinstance(value, Quantized):
        fields = ("block_size", "min_size", "stochastic", "seed")
        return {_TAG: "Quantized", **{f: getattr(value, f) for f in fields}}
    try:
        return {_TAG: "dtype", "name": jnp.dtype(value).name}
    except (TypeError, ValueError):
        return {_TAG: "unrecorded", "type": type(value).__name__}


def decode_options(options: dict, name: str, directory: str) -> dict:
    """`encode_options` reversed; CheckpointError where an option was not recordable."""

    def decode(key: str, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        tag = value.get(_TAG)
        if tag is None:
            return {k: decode(key, v) for k, v in value.items()}
        fields = {k: v for k, v in value.items() if k != _TAG}
        if tag == "dtype":
            return fields["name"]
        if tag in ("StochasticRounding", "Quantized"):
            import jadam

            return getattr(jadam, tag)(**fields)
        raise CheckpointError(
            f"{directory} was trained with optimizer option {key}= a {fields.get('type')} "
            f"(a schedule or function), which a checkpoint cannot store; pass the "
            f"optimizer: Trainer.load(path, optimizer=jadam.{name}(...))"
        )

    return {k: decode(k, v) for k, v in options.items()}


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{what} is missing: {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is corrupt ({path}): {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} is corrupt ({path}): not a JSON object")
    return d


def read_config(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}")
    cfg = _read_json(os.path.join(directory, "config.json"), "checkpoint config")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory} is not a jadam checkpoint (format {cfg.get('format')!r})"
        )
    return cfg


def load_trainer(cls, directory: str, *, model=None, optimizer=None, mesh=None, zero1=False):
    from jadam.train.history import History
    from jadam.train.models import model_from_config
    from jadam.train.trainer import _example

    cfg = read_config(directory)
    manifest = _read_json(os.path.join(directory, "manifest.json"), "checkpoint manifest")
    try:
        if model is None:
            if cfg["model"].get("kind") == "custom":
                raise CheckpointError(
                    f"{directory} holds a model of your own ({cfg['model'].get('class')}); "
                    "pass it: Trainer.load(path, model=MyModel(...))"
                )
            model = model_from_config(cfg["model"])
        opt = cfg["optimizer"]
        if optimizer is None and opt["name"] is None:
            raise CheckpointError(
                f"{directory} was trained with an optax object, not a named optimizer; "
                "pass it: Trainer.load(path, optimizer=tx)"
            )
        trainer = cls(
            model,
            optimizer if optimizer is not None else opt["name"],
            loss=cfg["loss"],
            metrics=cfg["metrics"],
            optimizer_options=None
            if optimizer is not None
            else decode_options(opt["options"], opt["name"], directory),
            l1=cfg["l1"],
            l2=cfg["l2"],
            seed=cfg["seed"],
            steps_per_call=cfg["steps_per_call"],
            mesh=mesh,
            zero1=zero1,
        )
        trainer.build(_example(cfg["input_spec"]))
        spec, out_shape = cfg["input_spec"], cfg["output_shape"]
        entries = manifest["arrays"]
    except KeyError as e:
        raise CheckpointError(f"checkpoint config in {directory} lacks {e}") from None
    if trainer.input_spec != spec or list(trainer.output_shape) != list(out_shape):
        raise CheckpointError("checkpoint does not match this model's inputs or outputs")

    # The model's own state gives the structure; the manifest must match it exactly.
    target = to_host(trainer.state)
    items = _flat_state(target)
    if len(items) != len(entries):
        raise CheckpointError(
            f"checkpoint does not match this model/optimizer: {len(entries)} arrays stored, "
            f"{len(items)} expected"
        )
    for (path, leaf), e in zip(items, entries, strict=True):
        leaf = np.asarray(leaf)
        if e["path"] != path or list(leaf.shape) != e["shape"] or str(leaf.dtype) != e["dtype"]:
            raise CheckpointError(
                "checkpoint does not match this model (another architecture?): "
                f"stored {e['path']} {e['shape']} {e['dtype']}, "
                f"model has {path} {list(leaf.shape)} {leaf.dtype}"
            )
    state_dir = os.path.join(directory, "state")
    if not os.path.isdir(state_dir):
        raise CheckpointError(f"checkpoint arrays are missing: {state_dir}")
    try:
        restored = _checkpointer().restore(state_dir)
    except Exception as e:  # orbax raises many types; all mean "unreadable"
        raise CheckpointError(f"checkpoint arrays in {state_dir} are unreadable: {e}") from None
    leaves = []
    for e in entries:
        a = restored.get(e["key"]) if isinstance(restored, dict) else None
        if a is None:
            raise CheckpointError(f"checkpoint is corrupt: array {e['path']} is missing")
        a = np.asarray(a)
        if list(a.shape) != e["shape"] or str(a.dtype) != e["dtype"] or _sha256(a) != e["sha256"]:
            raise CheckpointError(
                f"checkpoint is corrupt: array {e['path']} fails its SHA-256 check"
            )
        leaves.append(a)
    treedef = jax.tree.structure(target._asdict())  # the order _flat_state used
    state = type(target)(**jax.tree.unflatten(treedef, leaves))
    trainer.state = trainer.programs.place_state(state)
    trainer.np_rng.bit_generator.state = cfg["numpy_rng"]
    trainer.epochs_done = int(cfg["epochs_done"])
    hist_path = os.path.join(directory, "history.json")
    if os.path.exists(hist_path):
        with open(hist_path) as f:
            trainer.history = History.from_json(f.read())
    return trainer


# ---------------------------------------------------------------------------- export


def _abstract(spec: Any, b) -> Any:
    if "dict" in spec:
        return {k: _abstract(v, b) for k, v in spec["dict"].items()}
    if "tuple" in spec:
        return tuple(_abstract(v, b) for v in spec["tuple"])
    return jax.ShapeDtypeStruct((b, *spec["shape"]), np.dtype(spec["dtype"]))


def export_trainer(trainer, path: str, platforms=None, metadata: dict | None = None) -> None:
    from jax import export

    # Whole host copies: the exported function closes over constants, never over
    # arrays placed on a mesh (or on another process's devices).
    params, rest = to_host((trainer.state.params, trainer.rest))
    adapter, link = trainer.adapter, trainer.loss.link

    def infer(x):
        return link(adapter.apply(params, rest, x))

    (b,) = export.symbolic_shape("batch")  # any batch size at call time
    args = _abstract(trainer.input_spec, b)
    exp = export.export(jax.jit(infer), platforms=platforms)(args)
    blob = bytes(exp.serialize())
    sidecar = {
        "format": EXPORT_FORMAT,
        "version": VERSION,
        "jadam_version": _jadam_version(),
        "input_spec": trainer.input_spec,
        "output_shape": list(trainer.output_shape),
        "loss": trainer.loss.name,
        "outputs": {"binary": "probability", "categorical": "probabilities",
                    "sparse": "probabilities", "regression": "values"}[trainer.loss.task],
        "platforms": list(exp.platforms),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "metadata": metadata or {},
    }  # fmt: skip
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_blob, tmp_json = f"{path}.tmp-{tag}", f"{path}.json.tmp-{tag}"
    try:
        with open(tmp_blob, "wb") as f:
            f.write(blob)
        with open(tmp_json, "w") as f:
            json.dump(sidecar, f, indent=1)
        os.replace(tmp_blob, path)
        os.replace(tmp_json, path + ".json")
    finally:
        for t in (tmp_blob, tmp_json):
            if os.path.exists(t):
                os.remove(t)


class ExportedModel:
    """A deserialized exported model: call it with inputs shaped like the training data."""

    def __init__(self, exported, sidecar: dict):
        self._exported = exported
        self.sidecar = sidecar
        self.input_spec = sidecar["input_spec"]
        self.output_shape = tuple(sidecar["output_shape"])
        self.metadata = sidecar.get("metadata", {})

    def __call__(self, x: Any) -> np.ndarray:
        from jadam.train.trainer import _length, _spec, _to_tree

        x = _to_tree(x, "x")
        _length(x, "x")
        if _spec(x) != self.input_spec:
            raise ValueError(
                f"inputs {_spec(x)} do not match the exported model's {self.input_spec}"
            )
        return np.asarray(self._exported.call(x))

    def __repr__(self) -> str:
        return f"ExportedModel(inputs={self.input_spec}, outputs={self.output_shape})"


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load a model written by ``Trainer.export``; runs without the model's Python code.

    The file holds serialized StableHLO (no pickle, nothing executed on load); its
    SHA-256 is checked against the JSON sidecar ``<path>.json``.
    """
    from jax import export

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no exported model at {path}")
    sidecar = _read_json(path + ".json", "exported model sidecar")
    if sidecar.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}.json is not a jadam export sidecar")
    with open(path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != sidecar.get("sha256"):
        raise CheckpointError(f"exported model {path} is corrupt: SHA-256 mismatch")
    try:
        exported = export.deserialize(bytearray(blob))
    except Exception as e:
        raise CheckpointError(f"exported model {path} cannot be deserialized: {e}") from None
    return ExportedModel(exported, sidecar)
