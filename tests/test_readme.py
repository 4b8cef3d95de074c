"""The README's Python examples run as written, and its commands match CI's."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "block", re.findall(r"```python\n(.*?)```", README, flags=re.S), ids=lambda b: b[:30]
)
def test_readme_python_block_runs(block):
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = bash_blocks[1].strip()  # the second set-up-and-run command
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
