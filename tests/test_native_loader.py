"""The native kernels' loader: sources, flags, cache safety, status and the JADAM_NATIVE switches.

Tests that change how kernels load run in a subprocess with their own cache folder
(`XDG_CACHE_HOME`), so that this process's kernels stay as they are.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _native
from jadam._native import dispatch, loader
from jadam._storage.rounding import _GOLDEN

PACKAGE = os.path.dirname(jadam.__file__)
HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++").split()[0]) is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here")


def run_python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """`python -c code` with its own cache folder and the given environment variables."""
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    for name in ("JADAM_NATIVE", "JADAM_NATIVE_ARCH", "JADAM_NATIVE_THREADS"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def test_no_kernel_source_in_python_strings():
    """The kernels are `.cc` files; no Python module pastes C++ together."""
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(root, name)) as f:
                text = f.read()
            assert "_SOURCE" not in text, name
            for marker in ("#include", "XLA_FFI_DEFINE_HANDLER", "ffi::Buffer"):
                assert marker not in text, (name, marker)


def test_every_kernel_has_its_source_and_the_shared_header_ships():
    sources = sorted(f for f in os.listdir(os.path.join(PACKAGE, "_native")) if f.endswith(".cc"))
    assert sources == sorted(f"{name}.cc" for name in loader.KERNELS)
    assert os.path.exists(os.path.join(PACKAGE, "_native", loader.HEADER))
    with open(os.path.join(os.path.dirname(PACKAGE), "pyproject.toml")) as f:
        pyproject = f.read()
    assert '"_native/*.cc"' in pyproject and '"_native/*.h"' in pyproject


def test_bf16_kernel_hashes_with_the_jax_paths_constant():
    with open(os.path.join(PACKAGE, "_native", "adam_bf16.cc")) as f:
        assert f"kGolden = 0x{_GOLDEN:08X}u;" in f.read()


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("name", sorted(loader.KERNELS))
def test_every_source_compiles_with_warnings_as_errors(name, tmp_path):
    command = loader.compile_command(loader.KERNELS[name], str(tmp_path / "k.so"), werror=True)
    assert {"-Wall", "-Wextra", "-Werror"} <= set(command)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def test_flags_follow_the_architecture(monkeypatch):
    kernel = loader.KERNELS["adam_q8"]
    monkeypatch.delenv("JADAM_NATIVE_ARCH", raising=False)
    monkeypatch.setattr(loader.platform, "machine", lambda: "x86_64")
    assert "-march=native" in loader.flags(kernel)
    monkeypatch.setenv("JADAM_NATIVE_ARCH", "x86-64-v3")
    v3 = loader.flags(kernel)
    assert "-march=x86-64-v3" in v3 and "-mprefer-vector-width=512" not in v3
    monkeypatch.setenv("JADAM_NATIVE_ARCH", "x86-64-v4")
    assert {"-march=x86-64-v4", "-mprefer-vector-width=512"} <= set(loader.flags(kernel))
    key_v4 = loader._key(kernel)
    monkeypatch.setenv("JADAM_NATIVE_ARCH", "x86-64-v3")
    assert loader._key(kernel) != key_v4  # the level is part of the cache key
    monkeypatch.setenv("JADAM_NATIVE_ARCH", "haswell")
    with pytest.raises(ValueError, match="JADAM_NATIVE_ARCH"):
        loader.flags(kernel)
    monkeypatch.setattr(loader.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("JADAM_NATIVE_ARCH")
    arm = loader.flags(kernel)
    assert not any(f.startswith(("-march", "-mprefer")) for f in arm)
    monkeypatch.setenv("JADAM_NATIVE_ARCH", "x86-64-v3")
    with pytest.raises(ValueError, match="x86-64 level"):
        loader.flags(kernel)


@pytest.mark.parametrize(
    ("name", "value"), [("JADAM_NATIVE", "yes"), ("JADAM_NATIVE_THREADS", "-2")]
)
def test_malformed_switches_raise_naming_the_variable(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(loader, "loaded", {})  # as in a fresh process
    with pytest.raises(ValueError, match=name):
        loader.load("concat")


def test_thread_count_is_not_frozen_into_the_program():
    """The traced call carries 0 (the kernel's own default, read when it runs), or the
    explicit `threads=` of packed_adam."""
    if not dispatch.available("packed_adam"):
        pytest.skip("no C++ compiler here")
    params = {"w": jnp.ones(5000)}
    for threads, want in [(None, 0), (3, 3)]:
        opt = jadam.packed_adam(0.1, threads=threads)
        text = jax.jit(opt.step).lower(opt.init(params), params).as_text()
        assert re.search(rf"threads = {want} : i64", text), text[-2000:]


@pytest.mark.parametrize("mode", ["", "group", "other"])
def test_cache_folder_others_can_write_is_refused(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "jadam"
    folder.mkdir()
    folder.chmod({"": 0o700, "group": 0o770, "other": 0o757}[mode])
    if not mode:
        assert loader._safe_cache_dir() == str(folder)
        return
    with pytest.raises(loader.NativeError, match=re.escape(f"chmod go-w {folder}")):
        loader._safe_cache_dir()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs chown")
def test_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "jadam").mkdir(mode=0o700)
    os.chown(tmp_path / "jadam", 12345, -1)
    with pytest.raises(loader.NativeError, match="belongs to user id 12345"):
        loader._safe_cache_dir()


def test_refused_cache_folder_is_reported_by_build_and_status(tmp_path):
    folder = tmp_path / "cache" / "jadam"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    proc = run_python(
        """
        import jadam
        print(jadam.native_status()["concat"])
        import jadam.native
        raise SystemExit(jadam.native.main(["build", "concat"]))
        """,
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"concat: unavailable (refusing to load kernels from {folder}" in proc.stdout
    assert f"chmod go-w {folder}" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in os.listdir(folder)], "nothing is written into a refused folder"


@needs_compiler
def test_truncated_corrupt_or_foreign_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernel = loader.KERNELS["concat"]
    library = loader.ensure_built(kernel)
    record = library[: -len(".so")] + ".json"
    with open(record) as f:
        want = json.load(f)
    good = Path(library).read_bytes()
    assert len(good) == want["size"]

    def damage(how):
        if how == "truncated":
            data = good[: len(good) // 2]
        elif how == "corrupt":  # same size, one byte changed
            data = good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:]
        else:  # planted: some other library, and no record of it
            data = b"\x7fELF" + b"\0" * 5000
            os.remove(record)
        with open(library, "wb") as f:
            f.write(data)

    for how in ("truncated", "corrupt", "foreign"):
        damage(how)
        assert not loader._verified(library, record)
        assert loader.ensure_built(kernel) == library
        assert Path(library).read_bytes() == good, how  # rebuilt, the same bytes
        assert loader._verified(library, record)
    assert not [p for p in os.listdir(os.path.dirname(library)) if p.startswith(".build-")]

    # In a fresh process a truncated library is rebuilt, not loaded (that dies of SIGBUS).
    damage("truncated")
    proc = run_python(
        "import jadam.native as n; raise SystemExit(n.main(['build', 'concat']))", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "concat: loaded (compiled now" in proc.stdout
    assert Path(library).read_bytes() == good


def test_library_writable_by_others_is_not_trusted(tmp_path, monkeypatch):
    library, record = tmp_path / "k.so", tmp_path / "k.json"
    library.write_bytes(b"data")
    size, sha = loader._digest(str(library))
    record.write_text(json.dumps({"size": size, "sha256": sha}))
    library.chmod(0o644)
    assert loader._verified(str(library), str(record))
    library.chmod(0o666)
    assert not loader._verified(str(library), str(record))
    library.chmod(0o644)
    os.symlink(library, tmp_path / "link.so")
    assert not loader._verified(str(tmp_path / "link.so"), str(record))


STEP = """
    import json, sys, warnings
    import jax, jax.numpy as jnp, numpy as np, optax, jadam
    from jadam.native import NativeError, NativeFallbackWarning

    out = {"error": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out["params"] = [np.asarray(x).tolist() for x in jax.tree.leaves(train())]
            train()  # traced again: no second warning
        except NativeError as err:
            out["error"] = str(err)
    out["warnings"] = [str(w.message) for w in caught if w.category is NativeFallbackWarning]
    out["status"] = {k: [s.state, s.reason] for k, s in jadam.native_status().items()}
    print(json.dumps(out))
"""


def train():
    """Three q8 adamw steps on two eligible leaves (the kernels' choice is made per leaf)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 5000), "b": jnp.linspace(0.0, 2.0, 4096)}
    tx = jadam.adamw(0.1, weight_decay=0.01, mu_dtype="q8", nu_dtype="q8")
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.sin, p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(3):
        params, state = step(params, state)
    return params


def run_step(tmp_path, **env):
    """Run `train` in a fresh process: its parameters, warnings, error and kernel status."""
    script = "import jax, jax.numpy as jnp, optax, jadam\n" + inspect.getsource(train)
    proc = run_python(script + textwrap.dedent(STEP), tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_missing_compiler_warns_once_and_trains_as_the_jax_path(tmp_path, monkeypatch):
    out = run_step(tmp_path, CXX="/nonexistent/c++")
    assert out["error"] is None
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "adam_q8" in out["warnings"][0] and "/nonexistent/c++" in out["warnings"][0]
    state, reason = out["status"]["adam_q8"]
    assert state == "unavailable" and "/nonexistent/c++" in reason and "not found" in reason
    monkeypatch.setitem(_native.loaded, "adam_q8", False)  # the JAX path, here
    want = [np.asarray(x) for x in jax.tree.leaves(train())]
    for got, ref in zip(out["params"], want, strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), ref)


@pytest.mark.slow
def test_require_raises_naming_the_compiler_problem(tmp_path):
    out = run_step(tmp_path, CXX="/nonexistent/c++", JADAM_NATIVE="require")
    assert out["error"] is not None and "JADAM_NATIVE=require" in out["error"]
    assert "/nonexistent/c++" in out["error"] and "not found" in out["error"]
    assert out["warnings"] == []
    assert out["status"]["adam_q8"][0] == "unavailable"


@pytest.mark.slow
def test_switched_off_runs_the_jax_path_silently(tmp_path):
    out = run_step(tmp_path, CXX="/nonexistent/c++", JADAM_NATIVE="0")
    assert out["error"] is None and out["warnings"] == []
    assert {s for s, _ in out["status"].values()} == {"off"}


@needs_compiler
def test_compiler_error_text_is_reported(tmp_path, monkeypatch):
    """A source the compiler rejects: status and `build` give the compiler's own message."""
    broken = tmp_path / "src"
    broken.mkdir()
    shutil.copy(os.path.join(PACKAGE, "_native", loader.HEADER), broken)
    (broken / "concat.cc").write_text('#include "kernels.h"\nint f() { return undeclared_name; }\n')
    monkeypatch.setattr(loader, "HERE", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "loaded", {})
    monkeypatch.setattr(loader, "errors", {})
    monkeypatch.setattr(loader, "libraries", {})  # concat may be loaded by an earlier test
    with pytest.raises(loader.NativeError, match="undeclared_name"):
        loader.build(["concat"])
    status = loader.status()["concat"]
    assert status.state == "unavailable" and "failed to compile" in status.reason
    assert stat.S_IMODE(os.stat(tmp_path / "cache" / "jadam").st_mode) == 0o700
