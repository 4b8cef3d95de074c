"""Checkpoints (orbax arrays + JSON), and the safe replacement of folders jadam wrote.

A checkpoint folder holds exactly:

- ``state/``: the arrays (parameters, optimizer state (with the weight average under
  ``ema=``), step, RNG key, model state such as batch statistics), saved by orbax
  under plain keys ``a0000, a0001, ...``;
- ``config.json``: everything needed to rebuild the trainer as plain JSON (model
  config, loss, metrics, optimizer name and options, input shapes, NumPy shuffling
  RNG state, epochs done); see :mod:`jadam.train.options` for the options;
- ``history.json``;
- ``manifest.json``, written last: the format marker and version, and for each array
  its key, pytree path, shape, dtype and SHA-256, plus the SHA-256 of ``config.json``
  and ``history.json``. orbax does not checksum array data (a garbled file restores
  silently), so jadam verifies every array and file on load.

Saving. The new checkpoint is written into a temporary sibling folder
``.<name>.jadam-tmp-<hex>`` (on the same file system, so renames work), flushed to
disk, then swapped with the existing folder in ONE atomic step: ``renameat2`` with
``RENAME_EXCHANGE`` on Linux, ``renamex_np`` with ``RENAME_SWAP`` on macOS. The
previous version is complete at the path until that instant and the new one after
it, so a crash at any instant leaves a complete checkpoint at the path; the previous
version, now at the temporary name, is then deleted. Where the platform or file
system has no exchange, two renames are used (the old folder is moved aside to
``.<name>.jadam-old-<hex>`` first); a crash between them leaves no folder at the path,
a load then says a save was interrupted, and the next save moves the old one back.
Saves into one folder are serialized by a lock on the parent folder (``flock``), and
each save first removes what killed saves left behind, recognised by their name and
a marker file, or as complete jadam folders.

Saving never removes or moves what it cannot recognise as its own: an existing
folder is replaced only when its ``manifest.json`` (``run.json`` for a CLI run
folder) is a regular file with jadam's format marker and a known version, and it
holds no file jadam does not write. An empty path, ``.``, the working directory (or
a folder containing it), the home and root folders, links and files are refused.

Loading. Only regular files inside the folder are read (no links, FIFOs or devices),
each against a size limit. The manifest and the config are validated (types, sizes,
bounds) and the model's state shapes are computed abstractly (``jax.eval_shape``)
and compared with the manifest before anything is allocated, and the declared array
bytes must be present on disk. Every failure is a `CheckpointError` naming the file
and the problem. A reader racing a save sees the old or the new checkpoint (a read
that spanned a swap is retried), or a `CheckpointError` saying a save is in progress.

With several processes (``jax.distributed``), every process takes part in a save: a
sharded state (ZeRO-1 moments) is gathered to whole arrays (a collective), process 0
alone writes the folder (orbax restricted to process 0), and all processes meet at a
barrier afterwards, so none returns before the checkpoint is complete. A checkpoint
holds whole arrays, not shards: any mesh, or one device, restores any checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jadam
from jadam._sharding import to_host
from jadam.train import inputs
from jadam.train.history import History
from jadam.train.models import model_from_config
from jadam.train.options import OptionError, decode_options, encode_options

try:
    import fcntl
except ImportError:  # Windows: saves into one folder are not serialized
    fcntl = None

FORMAT = "jadam-checkpoint"
RUN_FORMAT = "jadam-run"
VERSION = 2  # 2: manifest.json also checksums config.json and history.json
READABLE_VERSIONS = (1, 2)

MAX_MANIFEST_BYTES = 64 << 20
MAX_CONFIG_BYTES = 4 << 20
MAX_HISTORY_BYTES = 64 << 20
MAX_ARRAYS = 1 << 20
MAX_STATE_FILES = 1 << 20
_DISK_SLACK = 1 << 20  # bytes: stored arrays may be smaller than declared by this much

# What jadam writes into each kind of folder: its marker file and every name it holds.
KINDS = {
    "checkpoint": (FORMAT, "manifest.json",
                   frozenset({"state", "config.json", "history.json", "manifest.json"})),
    "run folder": (RUN_FORMAT, "run.json",
                   frozenset({"checkpoint", "model.jaxexport", "model.jaxexport.json",
                              "history.json", "curves.png", "data.json", "metrics.json",
                              "run.json"})),
}  # fmt: skip
_PARTIAL = ".jadam-partial"  # inside a temporary folder while it is being written


class CheckpointError(ValueError):
    """A checkpoint, run folder or exported model is missing, corrupt, does not fit the
    model, or is a path jadam refuses to write."""


def jadam_version() -> str:
    return getattr(jadam, "__version__", "unknown")


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ---------------------------------------------------------------------------- destinations


def check_destination(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """The absolute path to write a ``what`` at; CheckpointError for a path that must
    never be replaced: empty, ``.``, the working directory or a folder holding it, the
    home or root folder, a link, or a file."""
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw.strip():
        raise CheckpointError(f"{what} path is empty ({raw!r}): give a folder name")
    full = os.path.abspath(raw)
    real = os.path.realpath(full)
    cwd = os.path.realpath(os.getcwd())
    if real == os.path.dirname(real):
        raise CheckpointError(f"{what} path {raw!r} is the root folder: give a new folder name")
    if real == os.path.realpath(os.path.expanduser("~")):
        raise CheckpointError(f"{what} path {raw!r} is the home folder: give a new folder name")
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise CheckpointError(
            f"{what} path {raw!r} is the working directory or contains it: give a new folder name"
        )
    if os.path.islink(full):
        raise CheckpointError(f"{what} path {full} is a symbolic link; give the folder itself")
    if os.path.lexists(full) and not os.path.isdir(full):
        raise CheckpointError(f"{what} path {full} is a file, not a folder; refusing to replace it")
    return full


def check_writable(path: str | os.PathLike, what: str = "run folder") -> str:
    """`check_destination`, plus: the folder can be created and written there (a test
    file is created and removed in the nearest existing folder). Nothing is left."""
    full = check_destination(path, what)
    probe_dir = os.path.dirname(full)
    while not os.path.lexists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise CheckpointError(f"cannot write the {what} {full}: {probe_dir} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jadam-probe-", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the {what} {full}: {probe_dir} is not writable ({e.strerror})"
        ) from None
    return full


def not_ours(path: str, kind: str) -> str | None:
    """None if ``path`` is an empty folder or a complete ``kind`` jadam wrote (format
    marker and known version in a valid marker file, nothing else inside); otherwise
    why not."""
    fmt, marker, allowed = KINDS[kind]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    names = os.listdir(path)
    if not names:
        return None
    try:
        doc = _read_json(os.path.join(path, marker), f"{kind} {marker}", MAX_MANIFEST_BYTES)
    except CheckpointError as e:
        return f"has no valid {marker} ({e})"
    if doc.get("format") != fmt or doc.get("version") not in READABLE_VERSIONS:
        return f"its {marker} is not a {fmt} marker of a known version"
    extra = sorted(set(names) - allowed)
    if extra:
        return f"holds files jadam did not write ({', '.join(extra[:5])})"
    return None


# ---------------------------------------------------------------------------- replacing


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                                rename_exchange)  # fmt: skip
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except OSError:  # no C library to load (unusual platforms)
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for here, _, files in os.walk(root):
        for f in files:
            _fsync(os.path.join(here, f))
        _fsync(here, directory=True)


def _remove_own(path: str) -> None:
    """Delete a folder of ours so that a kill at any point leaves it recognisable: the
    marker file is made first and removed last, then the (empty) folder."""
    marker = os.path.join(path, _PARTIAL)
    with open(marker, "a"):
        pass
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if name == _PARTIAL:
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
    os.remove(marker)
    os.rmdir(path)


@contextlib.contextmanager
def _locked(folder: str):
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temporaries(parent: str, base: str) -> list[tuple[str, str]]:
    pattern = re.compile(r"\." + re.escape(base) + r"\.jadam-(tmp|old)-[0-9a-f]{12}")
    return [(m.group(1), os.path.join(parent, n))
            for n in sorted(os.listdir(parent)) if (m := pattern.fullmatch(n))]  # fmt: skip


def _clean_up(final: str, kind: str) -> None:
    """Remove what killed saves of ``final`` left; move back a previous version that an
    interrupted two-rename replacement left aside. Runs under the folder lock."""
    parent, base = os.path.split(final)
    for how, p in _temporaries(parent, base):
        if os.path.islink(p) or not os.path.isdir(p):
            continue
        complete = not_ours(p, kind) is None
        if how == "old" and complete and not os.path.lexists(final):
            os.rename(p, final)
        elif os.path.lexists(os.path.join(p, _PARTIAL)) or complete:
            _remove_own(p)
        # else: not recognisably ours; left alone


def replace_dir(final: str | os.PathLike, write: Callable[[str], None], kind: str) -> str:
    """Write a ``kind`` (see `KINDS`) with ``write(tmp)`` into a temporary sibling, then
    put it at ``final`` in one atomic step (see the module docstring). An existing
    ``final`` must be one jadam wrote (`not_ours`); else CheckpointError, nothing moved."""
    final = check_destination(final, kind)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with _locked(parent):
        _clean_up(final, kind)
        if os.path.lexists(final):
            reason = not_ours(final, kind)
            if reason:
                raise CheckpointError(
                    f"{final} exists and {reason}: it is not a jadam {kind}; refusing to "
                    "overwrite it (choose another path, or move it away yourself)"
                )
        tmp = os.path.join(parent, f".{os.path.basename(final)}.jadam-tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(tmp)
        try:
            with open(os.path.join(tmp, _PARTIAL), "w"):
                pass
            write(tmp)
            os.remove(os.path.join(tmp, _PARTIAL))
            _fsync_tree(tmp)
            if not os.path.lexists(final):
                os.rename(tmp, final)
                tmp = None
            elif not _exchange(tmp, final):
                aside = tmp.replace(".jadam-tmp-", ".jadam-old-")
                os.rename(final, aside)
                os.rename(tmp, final)
                tmp = aside
        except BaseException:
            if tmp is not None and os.path.isdir(tmp):
                _remove_own(tmp)
            raise
        _fsync(parent, directory=True)
        if tmp is not None:  # the previous version
            _remove_own(tmp)
    return final


# ---------------------------------------------------------------------------- reading


def _read_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of a regular file (no link, FIFO or device), at most ``limit`` of them."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"{what} {path} is not a regular file (a link, FIFO or device); refusing to read it"
        )
    if st.st_size > limit:
        raise CheckpointError(f"{what} {path} is {st.st_size:,} bytes, over the {limit:,} limit")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the lstat
            raise CheckpointError(f"{what} {path} is not a regular file; refusing to read it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(f"{what} {path} is over the {limit:,}-byte limit")
    return data


def _parse_json(data: bytes, path: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{what} is corrupt ({path}): {str(e)[:200]}") from None


def _read_json(path: str, what: str, limit: int) -> dict:
    d = _parse_json(_read_file(path, what, limit), path, what)
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} is corrupt ({path}): not a JSON object")
    return d


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes, or CheckpointError."""
    return _read_json(os.fspath(path), what, limit)


def _state_bytes(state_dir: str) -> int:
    """Total size of ``state/``; CheckpointError for anything but folders and regular files."""
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint arrays are missing: {state_dir}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint arrays {state_dir} are not a folder")
    total, count = 0, 0
    for here, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            p = os.path.join(here, name)
            mode = os.lstat(p).st_mode
            count += 1
            if count > MAX_STATE_FILES:
                raise CheckpointError(f"{state_dir} holds more than {MAX_STATE_FILES:,} files")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise CheckpointError(
                    f"checkpoint file {p} is not a regular file (a link, FIFO or device); "
                    "refusing to read it"
                )
            total += os.lstat(p).st_size
    return total


_HEX64 = re.compile(r"[0-9a-f]{64}")
_ARRAY_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int8", "int16",
                           "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
                           "key<fry>"})  # fmt: skip


def _check_manifest(m: dict, path: str) -> list[dict]:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"checkpoint manifest {path} is malformed: {msg}")

    if m.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a jadam checkpoint manifest (format {str(m.get('format'))[:40]!r})"
        )
    if m.get("version") not in READABLE_VERSIONS:
        raise bad(f"version {str(m.get('version'))[:20]!r} is not one of {READABLE_VERSIONS}")
    entries = m.get("arrays")
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        raise bad("'arrays' is not a list of at most {MAX_ARRAYS:,} entries")
    keys = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"arrays[{i}] is not an object")
        key, p, shape, dtype, sha = (e.get(k) for k in ("key", "path", "shape", "dtype", "sha256"))
        if not isinstance(key, str) or not re.fullmatch(r"a\d{4,7}", key) or key in keys:
            raise bad(f"arrays[{i}] has a bad or repeated key")
        keys.add(key)
        if not isinstance(p, str) or len(p) > 4096:
            raise bad(f"arrays[{i}] has a bad path")
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
        ):
            raise bad(f"arrays[{i}] ({p[:80]}) has a bad shape")
        if dtype not in _ARRAY_DTYPES:
            raise bad(f"arrays[{i}] ({p[:80]}) has an unsupported dtype {str(dtype)[:40]!r}")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise bad(f"arrays[{i}] ({p[:80]}) has a bad sha256")
    files = m.get("files", {})
    if m["version"] >= 2 and (
        not isinstance(files, dict)
        or set(files) != {"config.json", "history.json"}
        or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values())
    ):
        raise bad("'files' does not hold the SHA-256 of config.json and history.json")
    return entries


def _declared_bytes(entries: list[dict]) -> int:
    return sum(math.prod(e["shape"]) * jnp.dtype(e["dtype"]).itemsize for e in entries)


def _check_config(cfg: dict, path: str) -> None:
    """Types and bounds of every field `load_trainer` reads; CheckpointError naming it."""

    def need(key: str, ok: Callable[[Any], bool], expected: str) -> Any:
        if key not in cfg:
            raise CheckpointError(f"checkpoint config {path} lacks {key!r}")
        v = cfg[key]
        if not ok(v):
            raise CheckpointError(
                f"checkpoint config {path}: {key} must be {expected}, got {str(v)[:80]!r}"
            )
        return v

    def is_int(v: Any, lo: int = 0) -> bool:
        return type(v) is int and v >= lo

    def is_number(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and v >= 0

    if cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a jadam checkpoint config (format {str(cfg.get('format'))[:40]!r})"
        )
    need("model", lambda v: isinstance(v, dict), "a JSON object")
    need("loss", lambda v: isinstance(v, str), "a string")
    need("metrics", lambda v: isinstance(v, list) and len(v) <= 32
         and all(isinstance(m, str) for m in v), "a list of names")  # fmt: skip
    opt = need("optimizer", lambda v: isinstance(v, dict), "a JSON object")
    if not (opt.get("name") is None or isinstance(opt.get("name"), str)):
        raise CheckpointError(f"checkpoint config {path}: optimizer name must be a string")
    if not isinstance(opt.get("options"), dict):
        raise CheckpointError(f"checkpoint config {path}: optimizer options must be a JSON object")
    need("l1", is_number, "a finite number >= 0")
    need("l2", is_number, "a finite number >= 0")
    need("seed", lambda v: type(v) is int, "an integer")
    need("steps_per_call", lambda v: v is None or is_int(v, 1), "null or an integer >= 1")
    ema = cfg.get("ema")  # absent in checkpoints written before ema=
    if not (ema is None or (type(ema) in (int, float) and 0 <= ema < 1)):
        raise CheckpointError(f"checkpoint config {path}: ema must be null or a number in [0, 1)")
    spec = need("input_spec", lambda v: True, "")
    try:
        inputs.check_spec(spec, "input_spec")
    except ValueError as e:
        raise CheckpointError(f"checkpoint config {path}: {e}") from None
    need("output_shape", lambda v: isinstance(v, list) and len(v) <= inputs.MAX_RANK
         and all(is_int(d) for d in v), "a list of integers >= 0")  # fmt: skip
    need("epochs_done", is_int, "an integer >= 0")
    rng = need("numpy_rng", lambda v: isinstance(v, dict), "a JSON object")
    try:
        np.random.default_rng().bit_generator.state = rng
    except (TypeError, ValueError, KeyError, OverflowError):
        raise CheckpointError(
            f"checkpoint config {path}: numpy_rng is not a NumPy PCG64 generator state"
        ) from None


# ---------------------------------------------------------------------------- orbax


def _flat_state(state: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state._asdict())
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves]


def _checkpointer():
    """orbax's checkpointer; with several processes, one that involves process 0 only
    (the arrays it gets are whole NumPy arrays, identical on every process)."""
    import orbax.checkpoint as ocp  # heavy: loaded on the first save or load

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


# ---------------------------------------------------------------------------- save


def save_trainer(trainer, directory: str | os.PathLike) -> None:
    """Write ``trainer``'s checkpoint at ``directory`` (see the module docstring)."""
    final = check_destination(directory, "checkpoint")  # every process: the same answer
    items = _flat_state(to_host(trainer.state))  # a collective when the state is sharded
    if jax.process_index() != 0:
        _barrier("jadam save_trainer")  # process 0 writes; wait until it is done
        return
    try:
        _write_checkpoint(trainer, final, items)
    finally:
        _barrier("jadam save_trainer")


def _write_checkpoint(trainer, directory: str, items) -> None:
    arrays = {f"a{i:04d}": np.asarray(leaf) for i, (_, leaf) in enumerate(items)}
    adapter = trainer.adapter
    model_cfg = adapter.config or {
        "kind": "custom",
        "flax": adapter.kind,
        "class": f"{type(adapter.model).__module__}.{type(adapter.model).__qualname__}",
    }
    config = {
        "format": FORMAT,
        "version": VERSION,
        "jadam_version": jadam_version(),
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
        "ema": trainer.ema,
        "input_spec": trainer.input_spec,
        "output_shape": list(trainer.output_shape),
        "epochs_done": trainer.epochs_done,
        "numpy_rng": trainer.np_rng.bit_generator.state,  # plain ints and strings
    }
    config_bytes = json.dumps(config, indent=1).encode()
    history_bytes = trainer.history.to_json().encode()
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
        "files": {
            "config.json": hashlib.sha256(config_bytes).hexdigest(),
            "history.json": hashlib.sha256(history_bytes).hexdigest(),
        },
    }

    def write(tmp: str) -> None:
        # No compression: array bytes are stored as is (and verified by the manifest).
        ckptr = _checkpointer()
        if jax.process_count() == 1:
            ckptr.save(os.path.join(tmp, "state"), arrays)
        else:
            import orbax.checkpoint as ocp

            ckptr.save(os.path.join(tmp, "state"), args=ocp.args.PyTreeSave(arrays))
        for name, data in (("config.json", config_bytes), ("history.json", history_bytes)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:  # last: marks it complete
            json.dump(manifest, f, indent=1)

    replace_dir(directory, write, "checkpoint")


# ---------------------------------------------------------------------------- load


def read_config(directory: str | os.PathLike) -> dict:
    """The validated ``config.json`` of a checkpoint (checksummed against its manifest)."""
    directory = os.fspath(directory)
    _, cfg, _ = _read_metadata(directory)
    return cfg


def _read_metadata(directory: str) -> tuple[list[dict], dict, bytes]:
    if not os.path.isdir(directory):
        _raise_missing(directory)
    man_path = os.path.join(directory, "manifest.json")
    manifest = _read_json(man_path, "checkpoint manifest", MAX_MANIFEST_BYTES)
    cfg_path = os.path.join(directory, "config.json")
    cfg_bytes = _read_file(cfg_path, "checkpoint config", MAX_CONFIG_BYTES)
    entries = _check_manifest(manifest, man_path)
    hist_path = os.path.join(directory, "history.json")
    files = manifest.get("files")
    hist_bytes = b""
    if files is not None or os.path.lexists(hist_path):
        hist_bytes = _read_file(hist_path, "checkpoint history", MAX_HISTORY_BYTES)
    for path, data in ((cfg_path, cfg_bytes), (hist_path, hist_bytes)):
        name = os.path.basename(path)
        if files is not None and hashlib.sha256(data).hexdigest() != files[name]:
            raise CheckpointError(
                f"checkpoint file {path} fails its SHA-256 check (edited or damaged)"
            )
    cfg = _parse_json(cfg_bytes, cfg_path, "checkpoint config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint config is corrupt ({cfg_path}): not a JSON object")
    _check_config(cfg, cfg_path)
    return entries, cfg, hist_bytes


def _raise_missing(directory: str):
    parent, base = os.path.split(os.path.abspath(directory))
    if os.path.isdir(parent) and _temporaries(parent, base):
        raise CheckpointError(
            f"no complete checkpoint at {directory}: a save to it is in progress or was "
            "interrupted; load again once it is done (the next save restores the previous one)"
        )
    raise FileNotFoundError(f"no checkpoint at {directory}")


def _identity(directory: str) -> tuple[int, ...] | None:
    """Which folder is at the path now. The inode alone is not enough: a deleted
    previous version's inode number is soon reused by the next save's folder; a
    rename (and the exchange) renews the moved folder's ctime."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns


def load_trainer(cls, directory: str | os.PathLike, *, model=None, optimizer=None, mesh=None,
                 zero1=False):  # fmt: skip
    """A trainer of class ``cls`` rebuilt from a checkpoint (see the module docstring)."""
    directory = os.path.abspath(os.fspath(directory))  # orbax takes absolute paths only
    for _ in range(3):
        before = _identity(directory)
        try:
            trainer = _load(cls, directory, model, optimizer, mesh, zero1)
        except (CheckpointError, OSError):
            if before is not None and _identity(directory) != before:
                continue  # the folder was swapped while it was read: read the new one
            raise
        if _identity(directory) == before:
            return trainer
    raise CheckpointError(
        f"{directory} changed while it was read, three times: a save to it is in progress; "
        "load again once it is done"
    )


def _load(cls, directory, model, optimizer, mesh, zero1):
    entries, cfg, hist_bytes = _read_metadata(directory)
    cfg_path = os.path.join(directory, "config.json")
    state_dir = os.path.join(directory, "state")
    on_disk = _state_bytes(state_dir)
    declared = _declared_bytes(entries)
    if declared > on_disk + _DISK_SLACK:
        raise CheckpointError(
            f"checkpoint manifest in {directory} declares {declared:,} bytes of arrays, but "
            f"{state_dir} holds {on_disk:,}: the arrays are missing or truncated"
        )
    history = History()
    if hist_bytes:
        try:
            history = History.from_json(hist_bytes.decode())
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise CheckpointError(
                f"checkpoint history {os.path.join(directory, 'history.json')} is malformed"
            ) from None

    if model is None:
        if cfg["model"].get("kind") == "custom":
            raise CheckpointError(
                f"{directory} holds a model of your own ({str(cfg['model'].get('class'))[:200]}); "
                "pass it: Trainer.load(path, model=MyModel(...))"
            )
        try:
            model = model_from_config(cfg["model"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint config {cfg_path}: model: {e}") from None
    opt = cfg["optimizer"]
    if optimizer is None and opt["name"] is None:
        raise CheckpointError(
            f"{directory} was trained with an optax object, not a named optimizer; "
            "pass it: Trainer.load(path, optimizer=tx)"
        )
    try:
        options = (
            None if optimizer is not None else decode_options(opt["options"], opt["name"], cfg_path)
        )
        trainer = cls(
            model, optimizer if optimizer is not None else opt["name"],
            loss=cfg["loss"], metrics=cfg["metrics"], optimizer_options=options,
            l1=cfg["l1"], l2=cfg["l2"], seed=cfg["seed"], steps_per_call=cfg["steps_per_call"],
            mesh=mesh, zero1=zero1, ema=cfg.get("ema"),
        )  # fmt: skip
    except OptionError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint config {cfg_path} does not rebuild a trainer: {e}"
        ) from None

    # The model's state, computed abstractly (nothing allocated), must match the manifest.
    spec = cfg["input_spec"]
    try:
        abstract_state, abstract_out = trainer.abstract_build(spec)
    except Exception as e:  # whatever the model raises for inputs it cannot take
        raise CheckpointError(
            f"checkpoint config {cfg_path}: the model cannot take inputs {str(spec)[:200]}: "
            f"{str(e)[:300]}"
        ) from None
    items = _flat_state(abstract_state)
    missing_scale = _missing_lr_scale(items, entries)
    if missing_scale is not None:  # written before the learning-rate scale existed: 1.0
        del items[missing_scale]
    if len(items) != len(entries):
        raise CheckpointError(
            f"checkpoint does not match this model/optimizer: {len(entries)} arrays stored, "
            f"{len(items)} expected"
        )
    for (path, leaf), e in zip(items, entries, strict=True):
        if e["path"] != path or list(leaf.shape) != e["shape"] or str(leaf.dtype) != e["dtype"]:
            raise CheckpointError(
                "checkpoint does not match this model (another architecture?): "
                f"stored {e['path'][:200]} {e['shape']} {e['dtype']}, "
                f"model has {path} {list(leaf.shape)} {leaf.dtype}"
            )
    if list(abstract_out.shape[1:]) != cfg["output_shape"]:
        raise CheckpointError("checkpoint does not match this model's inputs or outputs")

    trainer.build(inputs.example(spec))
    target = to_host(trainer.state)
    try:
        restored = _checkpointer().restore(state_dir)
    except Exception as e:  # orbax raises many types; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint arrays in {state_dir} are unreadable: {str(e)[:300]}"
        ) from None
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
    if missing_scale is not None:
        leaves.insert(missing_scale, np.ones((), np.float32))
    treedef = jax.tree.structure(target._asdict())  # the order _flat_state used
    state = type(target)(**jax.tree.unflatten(treedef, leaves))
    trainer.state = trainer.programs.place_state(state)
    trainer.np_rng.bit_generator.state = cfg["numpy_rng"]
    trainer.epochs_done = cfg["epochs_done"]
    trainer.history = history
    return trainer


def _missing_lr_scale(items: list, entries: list) -> int | None:
    """The index of the trainer's learning-rate scale among `items` when a checkpoint
    written before it existed lacks exactly that array, else None."""
    if len(items) != len(entries) + 1:
        return None
    for i, (path, leaf) in enumerate(items):
        if path.endswith(".scale") and leaf.shape == () and leaf.dtype == np.float32:
            rest = [p for j, (p, _) in enumerate(items) if j != i]
            if rest == [e["path"] for e in entries]:
                return i
    return None


def run_marker() -> dict:
    """The contents of a CLI run folder's ``run.json`` (its format marker)."""
    return {"format": RUN_FORMAT, "version": VERSION, "jadam_version": jadam_version()}
