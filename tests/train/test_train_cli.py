"""The `jadam` command end to end in a temporary folder."""

import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from jadam import cli
from jadam.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "jadam.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_train_with_no_arguments_then_evaluate_and_predict(tmp_path):
    r = _run("train", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Epoch 50/50" in r.stdout
    acc = float(r.stdout.split("test accuracy: ")[1].split()[0])
    assert acc >= 0.95
    (run,) = (tmp_path / "runs").iterdir()
    assert {p.name for p in run.iterdir()} >= {
        "checkpoint", "history.json", "curves.png", "model.jaxexport", "model.jaxexport.json",
        "data.json", "metrics.json",
    }  # fmt: skip
    assert len(json.loads((run / "history.json").read_text())["history"]["loss"]) == 50
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]

    r = _run("evaluate", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"accuracy: {acc:.4f}" in r.stdout

    b = load_breast_cancer()
    with open(tmp_path / "new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(b.feature_names) + ["target"])
        w.writerows(list(row) + [t] for row, t in zip(b.data[:20], b.target[:20], strict=True))
    r = _run("predict", str(run), "--input", "new.csv", "--output", "out.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and set(rows[0]) == {"probability", "label"}
    labels = [b.target_names.tolist().index(r["label"]) for r in rows]
    assert np.mean(np.array(labels) == b.target[:20]) >= 0.9
    r = _run("evaluate", str(run), "--data", "new.csv", cwd=tmp_path)
    assert r.returncode == 0 and "new.csv: loss:" in r.stdout, r.stderr


def test_cli_options_and_a_csv_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    lab = np.where(x[:, 0] + x[:, 1] > 0, "pos", "neg")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["f0", "f1", "f2", "cls"])
        w.writerows([*map(float, r), c] for r, c in zip(x, lab, strict=True))
    out = str(tmp_path / "run")
    code = cli.main([
        "train", "--data", str(tmp_path / "d.csv"), "--target", "cls", "--layers", "8,8",
        "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.001", "--batch-size", "16",
        "--epochs", "5", "--seed", "1", "--out", out, "--verbose", "0",
    ])  # fmt: skip
    assert code == 0
    with open(os.path.join(out, "checkpoint", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model"]["features"] == [8, 8, 1]
    assert cfg["optimizer"] == {
        "name": "adamw",
        "options": {"learning_rate": 0.01, "weight_decay": 0.001},
    }
    assert cli.main(["predict", out, "--input", str(tmp_path / "d.csv")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-121] == "probability,label" and printed[-1].split(",")[1] in ("pos", "neg")
    # an existing run folder is not overwritten by accident
    assert cli.main(["train", "--epochs", "1", "--out", out, "--verbose", "0"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--data", "nope"], "unknown dataset"),
        (["train", "--layers", "a,b"], "--layers"),
        (["train", "--optimizer", "sgdx"], "invalid choice"),  # argparse lists the names
        (["train", "--batch-size", "0"], "batch_size"),
        (["evaluate", "missing_run"], "not a jadam run folder"),
    ],
)
def test_cli_errors_are_clear_and_leave_nothing(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main([*args, "--epochs", "1"] if args[0] == "train" else args)
    except SystemExit as usage_error:  # argparse ends a usage error with status 2 itself
        code = usage_error.code
    assert code == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


@pytest.mark.parametrize("moments,dtype", [("q8", np.uint8), ("bf16", jnp.bfloat16)])
def test_cli_moments_storage_reaches_the_checkpoint(tmp_path, moments, dtype):
    out = str(tmp_path / "run")
    code = cli.main([
        "train", "--data", "digits", "--layers", "128", "--moments", moments,
        "--epochs", "2", "--out", out, "--verbose", "0",
    ])  # fmt: skip
    assert code == 0
    trainer = Trainer.load(os.path.join(out, "checkpoint"))  # options rebuilt from JSON
    mu = trainer.state.opt_state[0].mu
    kernel = mu["Dense_0"]["kernel"]  # 64 x 128: large enough to quantize
    leaf = kernel.codes if moments == "q8" else kernel
    assert leaf.dtype == dtype
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["test_accuracy"] > 0.8


def test_cli_task_makes_integer_labels_classes_or_numbers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2))
    lab = np.sign(np.round(x[:, 0])).astype(int)  # -1 / 0 / 1
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Feature A", "feature-b", "y"])
        w.writerows([*r, c] for r, c in zip(x, lab, strict=True))
    base = ["train", "--data", str(tmp_path / "d.csv"), "--target", "y", "--layers", "4",
            "--epochs", "1", "--batch-size", "16"]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "reg")]) == 0
    assert "task regression (detected; --task classification" in capsys.readouterr().out
    out = str(tmp_path / "cls")
    assert cli.main([*base, "--task", "classification", "--out", out]) == 0
    assert "task multiclass, classes [-1, 0, 1] (--task classification)" in capsys.readouterr().out
    assert cli.main(["evaluate", out]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert cli.main(["predict", out, "--input", str(tmp_path / "d.csv")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "p_-1,p_0,p_1,label" and len(printed) == 91
    assert {r.split(",")[-1] for r in printed[1:]} <= {"-1", "0", "1"}
