"""The package's shape: layers point one way, and `import jadam` stays lean."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    # The contracts live in pyproject.toml ([tool.importlinter]).
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_import_jadam_loads_no_trainer_dependency():
    heavy = ("flax", "orbax", "sklearn", "matplotlib", "tqdm")
    code = (
        "import sys, jadam; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules)); "
        "jadam.Trainer; print('flax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["[]", "True"]


def test_no_kernel_source_in_python_strings():
    for path in (ROOT / "jadam").rglob("*.py"):
        text = path.read_text()
        for marker in ("_SOURCE", "#include", "XLA_FFI_DEFINE", 'extern "C"'):
            assert marker not in text, (path, marker)
