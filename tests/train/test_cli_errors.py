"""The `jadam` command fails with one line on stderr and exit status 2, never a traceback."""

import csv
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jadam import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run trained on a CSV with features a, b, c and string labels."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    lab = np.where(x[:, 0] > 0, "pos", "neg")
    data = _write_csv(
        root / "d.csv", ["a", "b", "c", "label"], [[*r, c] for r, c in zip(x, lab, strict=True)]
    )
    run = str(root / "run")
    argv = ["train", "--data", data, "--target", "label", "--layers", "4", "--epochs", "1",
            "--out", run, "--verbose", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    return root, run, data, x


@pytest.fixture
def run_copy(trained, tmp_path):
    root, run, data, x = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy, data, x


def _fails(capsys, argv, match):
    """The command returns 2 and prints one line naming the problem, no traceback."""
    code = cli.main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, (out.out, out.err)
    assert "Traceback" not in out.err + out.out
    assert len(err.splitlines()) == 1 and err.startswith("jadam "), err
    assert ": error: " in err and match in err, err
    return err


def _garble(path, text="{not json"):
    with open(path, "w") as f:
        f.write(text)


# -- malformed run folders in evaluate and predict


def test_evaluate_and_predict_on_a_missing_run_folder(tmp_path, capsys, trained):
    _fails(capsys, ["evaluate", str(tmp_path / "nope")], "not a jadam run folder")
    _fails(capsys, ["predict", str(tmp_path / "nope"), "--input", trained[2]],
           "not a jadam run folder")  # fmt: skip


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize(
    "text,match",
    [
        (None, "no data.json"),
        ("{not json", "data.json"),
        ("[1, 2]", "not a JSON object"),
        ('{"task": "binary"}', "lacks"),
        ("\udcff", "data.json"),  # not UTF-8
    ],
)
def test_a_missing_or_garbled_data_json(capsys, run_copy, command, text, match):
    run, data, _ = run_copy
    path = os.path.join(run, "data.json")
    if text is None:
        os.remove(path)
    elif text == "\udcff":
        with open(path, "wb") as f:
            f.write(b"\xff\xfe{")
    else:
        _garble(path, text)
    argv = [command, run] + (["--input", data] if command == "predict" else [])
    _fails(capsys, argv, match)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("feature_names", "abc", "feature_names"),
        ("feature_names", ["a", "a", "c"], "feature_names"),
        ("mean", [0.0], "mean"),
        ("std", [1.0, 0.0, 1.0], "std"),
        ("std", ["x", 1, 1], "std"),
        ("task", "ranking", "task"),
        ("classes", None, "classes"),
        ("classes", [{"a": 1}, 2], "classes"),
        ("target", 3, "target"),
        ("seed", "zero", "seed"),
    ],
)
def test_data_json_with_bad_fields(capsys, run_copy, field, value, match):
    run, data, _ = run_copy
    path = os.path.join(run, "data.json")
    with open(path) as f:
        info = json.load(f)
    info[field] = value
    with open(path, "w") as f:
        json.dump(info, f)
    err = _fails(capsys, ["evaluate", run], match)
    assert "data.json" in err
    if field != "seed":  # predict does not need the split
        _fails(capsys, ["predict", run, "--input", data], match)


def test_a_garbled_checkpoint_or_export(capsys, run_copy):
    run, data, _ = run_copy
    _garble(os.path.join(run, "checkpoint", "manifest.json"))
    _fails(capsys, ["evaluate", run], "manifest")
    _garble(os.path.join(run, "model.jaxexport.json"))
    _fails(capsys, ["predict", run, "--input", data], "model.jaxexport")
    shutil.rmtree(os.path.join(run, "checkpoint"))
    os.remove(os.path.join(run, "model.jaxexport"))
    _fails(capsys, ["evaluate", run], "checkpoint")
    _fails(capsys, ["predict", run, "--input", data], "model.jaxexport")


def test_a_garbled_metrics_or_history_file_does_not_matter(capsys, run_copy):
    run, data, _ = run_copy
    _garble(os.path.join(run, "metrics.json"))
    _garble(os.path.join(run, "history.json"))
    assert cli.main(["evaluate", run]) == 0
    assert cli.main(["predict", run, "--input", data]) == 0
    assert "Traceback" not in capsys.readouterr().err


# -- inputs and outputs of predict and evaluate


def test_predict_on_duplicate_column_names_is_an_error(capsys, run_copy, tmp_path):
    run, _, x = run_copy
    bad = _write_csv(tmp_path / "dup.csv", ["a", "b", "a", "c"],
                     [[r[0], r[1], -r[0], r[2]] for r in x])  # fmt: skip
    _fails(capsys, ["predict", run, "--input", bad], "duplicate column names")
    spaced = _write_csv(tmp_path / "dup2.csv", ["a", "b ", " b", "c"], [[1, 2, 3, 4]])
    _fails(capsys, ["predict", run, "--input", spaced], "'b'")


def test_predict_reads_semicolons_bom_headerless_and_fuzzy_names(capsys, run_copy, tmp_path):
    run, data, x = run_copy
    assert cli.main(["predict", run, "--input", data]) == 0
    want = capsys.readouterr().out
    semi = _write_csv(tmp_path / "s.csv", ["C", "A", "B"], [[r[2], r[0], r[1]] for r in x], ";")
    with open(semi, "rb") as f:
        raw = f.read()
    with open(semi, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    assert cli.main(["predict", run, "--input", semi]) == 0
    assert capsys.readouterr().out == want
    bare = _write_csv(tmp_path / "bare.csv", None, [list(r) for r in x], "\t")
    assert cli.main(["predict", run, "--input", bare]) == 0
    assert capsys.readouterr().out == want
    _fails(capsys, ["predict", run, "--input", _write_csv(tmp_path / "w.csv", None, [[1, 2]])],
           "no header row and 2 columns")  # fmt: skip
    _fails(capsys, ["predict", run, "--input",
                    _write_csv(tmp_path / "m.csv", ["a", "b", "d"], [[1, 2, 3]])],
           "lacks columns ['c']")  # fmt: skip


def test_evaluate_a_file_with_other_names_or_order(capsys, run_copy, tmp_path):
    run, data, x = run_copy
    lab = np.where(x[:, 0] > 0, "pos", "neg")
    other = _write_csv(tmp_path / "o.csv", ["Label", "c", "B", "a"],
                       [[c, r[2], r[1], r[0]] for r, c in zip(x, lab, strict=True)])  # fmt: skip
    assert cli.main(["evaluate", run, "--data", other]) == 0
    assert "o.csv: loss:" in capsys.readouterr().out
    extra = _write_csv(tmp_path / "e.csv", ["a", "b", "c", "label", "id"], [[1, 2, 3, "pos", 7]])
    _fails(capsys, ["evaluate", run, "--data", extra], "extra columns ['id']")
    _fails(capsys, ["evaluate", run, "--data", str(tmp_path / "none.csv")], "none.csv")


def test_predict_input_and_output_os_errors(capsys, run_copy, tmp_path):
    run, data, _ = run_copy
    _fails(capsys, ["predict", run, "--input", str(tmp_path / "none.csv")], "none.csv")
    _fails(capsys, ["predict", run, "--input", str(tmp_path)], str(tmp_path))  # a folder
    _fails(capsys, ["predict", run, "--input", data, "--output", str(tmp_path)],
           str(tmp_path))  # fmt: skip
    _fails(capsys, ["predict", run, "--input", data, "--output",
                    str(tmp_path / "no" / "dir" / "p.csv")], "p.csv")  # fmt: skip
    if os.path.exists("/dev/full"):  # a full disk
        _fails(capsys, ["predict", run, "--input", data, "--output", "/dev/full"],
               "No space left")  # fmt: skip


def test_predict_does_not_leave_a_half_written_output(capsys, run_copy, tmp_path, monkeypatch):
    run, data, _ = run_copy
    out = tmp_path / "p.csv"
    out.write_text("previous\n")

    class FullDisk:  # a csv writer on a disk that fills up after the header
        def __init__(self, f, *args, **kwargs):
            self.w = real(f, *args, **kwargs)

        def writerow(self, row):
            self.w.writerow(row)

        def writerows(self, rows):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = csv.writer
    monkeypatch.setattr(csv, "writer", FullDisk)
    _fails(capsys, ["predict", run, "--input", data, "--output", str(out)], "No space left")
    assert out.read_text() == "previous\n"
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "run"]


# -- train


def test_train_os_errors(capsys, tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    base = ["train", "--data", "iris", "--layers", "4", "--epochs", "1", "--verbose", "0"]
    _fails(capsys, [*base, "--out", "file/run"], "file")  # below a file
    _fails(capsys, [*base, "--data", str(tmp_path / "none.csv"), "--target", "y"], "none.csv")
    _fails(capsys, [*base, "--data", str(tmp_path), "--target", "y"], "unknown dataset")

    from jadam.train.history import History

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(History, "save", full)
    _fails(capsys, [*base, "--out", "run"], "No space left on device")
    assert not os.path.exists("run")


def test_train_bad_labels_for_the_task(capsys, tmp_path):
    path = _write_csv(tmp_path / "r.csv", ["x", "y"], [[i, i * 0.5] for i in range(20)])
    _fails(capsys, ["train", "--data", path, "--target", "y", "--task", "classification",
                    "--epochs", "1", "--verbose", "0", "--out", str(tmp_path / "r")],
           "classification needs integer or string labels")  # fmt: skip


def test_a_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "jadam.cli", "predict", str(tmp_path), "--input", "x.csv"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
