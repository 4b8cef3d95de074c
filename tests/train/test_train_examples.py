"""Every script in examples/ runs (in a fresh process) and passes its own asserts."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def test_the_four_examples_exist():
    assert {"keras_workflow.py", "two_inputs.py", "digits_serve.py", "custom_loop.py"} <= set(
        EXAMPLES
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_in_under_a_minute(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["MPLBACKEND"] = "Agg"
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "accuracy" in r.stdout
    assert elapsed < 90, f"{name} took {elapsed:.0f}s"  # target < 60 s; slack for busy CI
