"""What saving may replace, what loading trusts: checkpoints and run folders on disk."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jadam import cli
from jadam.train import CheckpointError, Trainer
from jadam.train.models import ACTIVATIONS, MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trainer(features=(4, 1), width=3, seed=0):
    t = Trainer(MLP(features), "adam", loss="binary_crossentropy", seed=seed)
    t.build(np.zeros((1, width), np.float32))
    return t


def _python(code: str, cwd, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# ---------------------------------------------------------------- what saving may replace


def test_empty_path_and_the_working_directory_are_refused(tmp_path, monkeypatch):
    t = _trainer()
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for path in ("", ".", str(tmp_path), "./", os.path.dirname(str(tmp_path))):
        with pytest.raises(CheckpointError, match="working directory|empty"):
            t.save(path)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_home_root_and_a_file_are_refused(tmp_path, monkeypatch):
    t = _trainer()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="is the home folder"):
        t.save(tmp_path / "home")
    with pytest.raises(CheckpointError, match="is the root folder"):
        t.save("/")
    (tmp_path / "file").write_text("data")
    with pytest.raises(CheckpointError, match=r"file.*is a file"):
        t.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "data"


def test_a_folder_with_a_manifest_that_is_not_ours_survives(tmp_path):
    t = _trainer()
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text("{}")
    (app / "index.html").write_text("x")
    with pytest.raises(CheckpointError, match=r"app.*refusing to overwrite"):
        t.save(app)
    assert sorted(os.listdir(app)) == ["index.html", "manifest.json"]


def test_a_checkpoint_with_a_file_of_the_users_is_not_replaced(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        t.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"


def test_stale_temporaries_are_removed_and_foreign_ones_kept(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    stale = tmp_path / ".ck.jadam-tmp-0123456789ab"  # a killed save's folder
    (stale / "state").mkdir(parents=True)
    (stale / ".jadam-partial").write_text("")
    foreign = tmp_path / ".ck.jadam-tmp-ba9876543210"  # same pattern, not ours
    foreign.mkdir()
    (foreign / "data.bin").write_text("x")
    t.save(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == [foreign.name, "ck"]


_CRASHER = """
import os, shutil, sys
from jadam.train.checkpoint import replace_dir

source, folder, count_file = sys.argv[1], sys.argv[2], sys.argv[3]
paths = sys.argv[4:]


def write(tmp):  # the new checkpoint's files, in the order a save writes them
    shutil.copytree(os.path.join(source, "state"), os.path.join(tmp, "state"))
    for name in ("config.json", "history.json", "manifest.json"):
        shutil.copy(os.path.join(source, name), os.path.join(tmp, name))


def replace(path, when):
    count = 0

    def hook(event, args):  # dies (no cleanup, like SIGKILL) at the when-th file operation
        nonlocal count
        arg = os.fsdecode(args[0]) if args and isinstance(args[0], str | bytes) else ""
        if (event == "open" or event.startswith(("os.", "shutil."))) and arg.startswith(folder):
            count += 1
            if count == when:
                os._exit(137)

    sys.addaudithook(hook)
    replace_dir(path, write, "checkpoint")
    with open(count_file, "w") as f:
        f.write(str(count))


# One fork per instant: each child replaces one checkpoint and dies at its instant.
for when, path in enumerate(paths):  # when=0: a dry run that never dies (counts)
    pid = os.fork()
    if pid == 0:
        try:
            replace(path, when)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
"""


def test_a_save_killed_at_any_of_its_file_operations_leaves_a_complete_checkpoint(tmp_path):
    old, new = _trainer(seed=0), _trainer(seed=1)
    new.epochs_done = 7  # tells the new checkpoint from the old one
    new.save(tmp_path / "source")
    folder = tmp_path / "saves"
    folder.mkdir()
    script = tmp_path / "crasher.py"
    script.write_text(_CRASHER)
    count_file = tmp_path / "count"

    def crash(paths):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        args = [tmp_path / "source", folder, count_file, *paths]
        r = subprocess.run([sys.executable, script, *map(str, args)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr

    old.save(folder / "dry")
    crash([folder / "dry"])
    total = int(count_file.read_text())  # file operations of one replacing save
    assert total >= 20
    paths = [folder / f"ck{i}" for i in range(total + 1)]
    for p in paths[1:]:
        old.save(p)
    crash([folder / "dry", *paths[1:]])  # instant i kills ck{i}'s replacement
    seen = set()
    for p in paths[1:]:
        back = Trainer.load(p)  # complete: the old or the new, never missing or half
        assert back.epochs_done in (0, 7), p
        seen.add(back.epochs_done)
    assert seen == {0, 7}  # the kills fell on both sides of the swap
    for p in paths[1:]:
        old.save(p)  # the next save removes what the killed one left
    assert sorted(os.listdir(folder)) == sorted(["dry", *(p.name for p in paths[1:])])


# ---------------------------------------------------------------- what loading trusts


def _rewrite_config(ck, edit, fix_checksum=True):
    cfg_path = ck / "config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    if fix_checksum:  # a consistent edit: checksums alone would not see it
        man_path = ck / "manifest.json"
        man = json.loads(man_path.read_text())
        if "files" in man:
            man["files"]["config.json"] = hashlib.sha256(cfg_path.read_bytes()).hexdigest()
        man_path.write_text(json.dumps(man))


def test_an_edited_config_is_refused(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")

    def edit(cfg):
        cfg["model"]["activation"] = "tanh"

    _rewrite_config(tmp_path / "ck", edit, fix_checksum=False)
    with pytest.raises(CheckpointError, match=r"config.json.*(SHA-256|checksum)"):
        Trainer.load(tmp_path / "ck")


def test_an_edited_history_is_refused(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    (tmp_path / "ck" / "history.json").write_text('{"epoch": [0], "history": {"loss": [1]}}')
    with pytest.raises(CheckpointError, match=r"history.json.*(SHA-256|checksum)"):
        Trainer.load(tmp_path / "ck")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model", {"kind": "MLP", "features": "abc", "activation": "relu"}, "features"),
        ("model", {"kind": "MLP", "features": [4, 1], "activation": "nope"}, "activation"),
        ("model", [1, 2], "model"),
        ("input_spec", {"shape": [4, 1e9], "dtype": "float32"}, "input_spec"),
        ("input_spec", {"tuple": [{"tuple": []}] * 2}, "input_spec"),
        ("loss", 3, "loss"),
        ("metrics", "accuracy", "metrics"),
        ("optimizer", {"name": "adam", "options": []}, "options"),
        ("seed", "0", "seed"),
        ("epochs_done", -1, "epochs_done"),
        ("numpy_rng", {"bit_generator": "Nope"}, "numpy_rng"),
        ("l2", "x", "l2"),
    ],
)
def test_malformed_config_fields_are_checkpoint_errors(tmp_path, field, value, match):
    t = _trainer()
    t.save(tmp_path / "ck")
    _rewrite_config(tmp_path / "ck", lambda cfg: cfg.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=match):
        Trainer.load(tmp_path / "ck")


def test_deeply_nested_spec_is_a_checkpoint_error(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    ck = tmp_path / "ck"
    nested = '{"tuple": [' * 5000 + '{"shape": [3], "dtype": "float32"}' + "]}" * 5000
    cfg = json.loads((ck / "config.json").read_text())
    cfg["input_spec"] = None
    (ck / "config.json").write_text(
        json.dumps(cfg).replace('"input_spec": null', '"input_spec": ' + nested)
    )
    man = json.loads((ck / "manifest.json").read_text())
    if "files" in man:
        man["files"]["config.json"] = hashlib.sha256((ck / "config.json").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="config"):
        Trainer.load(ck)


def test_malformed_manifest_entries_are_checkpoint_errors(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    path = tmp_path / "ck" / "manifest.json"
    good = json.loads(path.read_text())
    for edit in (
        lambda m: m.__setitem__("arrays", 3),
        lambda m: m["arrays"].__setitem__(0, "x"),
        lambda m: m["arrays"][0].__setitem__("shape", [2**40, 2**40]),
        lambda m: m["arrays"][0].__setitem__("dtype", "object"),
        lambda m: m.__delitem__("arrays"),
    ):
        m = json.loads(json.dumps(good))
        edit(m)
        path.write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match="manifest"):
            Trainer.load(tmp_path / "ck")


def test_links_leaving_the_folder_are_refused(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    outside = tmp_path / "outside.json"
    os.replace(tmp_path / "ck" / "config.json", outside)
    os.symlink(outside, tmp_path / "ck" / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json.*regular file"):
        Trainer.load(tmp_path / "ck")


_HOSTILE = """
import json, os, resource, sys, time
import numpy as np
from jadam.train import CheckpointError, Trainer
from jadam.train.models import MLP

t = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
t.build(np.zeros((1, 3), np.float32))
t.save("good")
Trainer.load("good")  # warm: everything a load needs is imported and compiled
results = {}
for case in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    try:
        Trainer.load(case)
        msg = None
    except CheckpointError as e:
        msg = str(e)
    results[case] = {
        "error": msg, "seconds": time.perf_counter() - t0,
        "rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One subprocess loads several hostile checkpoints, measuring time and peak memory."""
    root = tmp_path_factory.mktemp("hostile")
    t = _trainer(features=(4, 1), width=3)

    def make(name, edit):
        t.save(root / name)
        _rewrite_config(root / name, edit)

    make(
        "wide_input", lambda c: c.__setitem__("input_spec", {"shape": [4, 1e9], "dtype": "float32"})
    )
    make(
        "big_input",
        lambda c: c.__setitem__("input_spec", {"shape": [4, 10**9], "dtype": "float32"}),
    )
    make(
        "long_input",
        lambda c: c.__setitem__("input_spec", {"shape": [4, 10**7], "dtype": "float32"}),
    )
    make("big_model", lambda c: c["model"].__setitem__("features", [2**28, 1]))
    t.save(root / "fifo")
    state = root / "fifo" / "state"
    victim = next(os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs)
    os.remove(victim)
    os.mkfifo(victim)
    r = _python(
        _HOSTILE.replace(
            "sys.argv[1:]", repr(["wide_input", "big_input", "long_input", "big_model", "fifo"])
        ),
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["wide_input", "big_input", "long_input", "big_model"])
def test_hostile_checkpoint_is_rejected_before_allocating(hostile, case):
    res = hostile[case]
    assert res["error"] is not None
    assert res["rss_mib"] < 100, res
    print(f"{case}: rejected in {res['seconds']:.3f} s, +{res['rss_mib']:.1f} MiB: {res['error']}")


def test_a_fifo_in_the_state_folder_does_not_hang(hostile):
    assert "regular file" in hostile["fifo"]["error"]


def test_a_reader_during_a_save_sees_old_or_new(tmp_path):
    t = _trainer()
    t.save(tmp_path / "ck")
    # A save that stopped between the two steps of an unsafe replace leaves no folder
    # at the path; the reader is told a save is in progress instead of FileNotFoundError.
    os.rename(tmp_path / "ck", tmp_path / ".ck.jadam-old-0123456789ab")
    with pytest.raises(CheckpointError, match="save .*in progress"):
        Trainer.load(tmp_path / "ck")
    t.save(tmp_path / "ck")  # the next save puts things right
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    Trainer.load(tmp_path / "ck")


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hidden=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    width=st.integers(1, 4),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    optimizer=st.sampled_from(["adam", "adamw", "nadam", "amsgrad"]),
    lr=st.floats(1e-5, 1.0),
    epochs=st.integers(0, 10**6),
    losses=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=False), st.just(0.5)), max_size=4
    ),
)
def test_checkpoint_round_trip_property(
    tmp_path, hidden, width, activation, optimizer, lr, epochs, losses
):
    t = Trainer(MLP((*hidden, 1), activation=activation), optimizer, loss="binary_crossentropy",
                optimizer_options={"learning_rate": lr})  # fmt: skip
    t.build(np.zeros((1, width), np.float32))
    t.epochs_done = epochs
    for i, v in enumerate(losses):
        t.history.append(i, {"loss": v})
    t.np_rng.random(3)
    path = tmp_path / "ck"
    t.save(path)
    back = Trainer.load(path)
    assert back.epochs_done == epochs and back.optimizer_config == t.optimizer_config
    assert back.adapter.config == t.adapter.config
    assert back.np_rng.bit_generator.state == t.np_rng.bit_generator.state
    np.testing.assert_array_equal(
        back.history.history.get("loss", []), t.history.history.get("loss", [])
    )
    import jax

    for a, b in zip(
        jax.tree.leaves(jax.device_get(t.state)),
        jax.tree.leaves(jax.device_get(back.state)),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- run folders (jadam train --out)


def _train(out, *extra):
    return cli.main(
        ["train", "--epochs", "1", "--layers", "4", "--verbose", "0", "--out", str(out), *extra]
    )


def test_overwrite_does_not_replace_a_folder_that_merely_holds_data_json(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    assert _train(out, "--overwrite") == 2
    assert "not a jadam run folder" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["data.json", "thesis.tex"]


def test_overwrite_replaces_a_run_folder_jadam_wrote(tmp_path):
    out = tmp_path / "run"
    assert _train(out) == 0
    assert _train(out, "--overwrite") == 0
    assert sorted(n for n in os.listdir(tmp_path)) == ["run"]
    assert json.loads((out / "run.json").read_text())["format"] == "jadam-run"


def test_an_out_below_a_file_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tmp_path / "file" / "run", "--epochs", "3", "--verbose", "2") == 2
    out, err = capsys.readouterr()
    assert "Epoch" not in out  # refused before training
    assert "file" in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_out_fails_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permissions do not apply")
        assert _train(ro / "run", "--epochs", "3", "--verbose", "2") == 2
    finally:
        os.chmod(ro, 0o700)
    out, err = capsys.readouterr()
    assert "Epoch" not in out  # refused before training
    assert str(ro) in err and len(err.strip().splitlines()) == 1


# A read that meets a folder being swapped away fails inside orbax (and is retried);
# tensorstore then completes futures on orbax's closed asyncio loop ("Event loop is
# closed", reported as unraisable): third-party noise, ignored for this test only.
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
def test_readers_racing_a_writer_see_old_or_new(tmp_path):
    import threading

    a, b = _trainer(seed=0), _trainer(seed=1)
    b.epochs_done = 7
    path = tmp_path / "ck"
    a.save(path)
    Trainer.load(path)  # warm
    done = threading.Event()
    errors = []

    def writer():
        try:
            for i in range(12):
                (b if i % 2 else a).save(path)
        except Exception as e:  # reported below: the writer must not fail either
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not done.is_set() or not seen:
        try:
            seen.append(Trainer.load(path).epochs_done)
        except CheckpointError as e:
            assert "in progress" in str(e)
            seen.append("in progress")
    thread.join()
    assert not errors, errors
    assert set(seen) <= {0, 7, "in progress"}


def test_checkpoint_without_the_learning_rate_scale_is_read_with_scale_one():
    """Checkpoints written before the trainer kept a learning-rate scale lack exactly that
    array; loading recognises the gap (and only that gap) and fills in 1.0."""
    import numpy as np

    from jadam.train.checkpoint import _missing_lr_scale

    f32 = np.zeros((), np.float32)
    items = [(".params['w']", np.zeros((2,), np.float32)), (".opt_state[1].scale", f32),
             (".step", np.zeros((), np.int32))]  # fmt: skip
    entries = [{"path": ".params['w']"}, {"path": ".step"}]
    assert _missing_lr_scale(items, entries) == 1
    assert _missing_lr_scale(items, [*entries, {"path": ".x"}]) is None
    assert _missing_lr_scale(items, [{"path": ".params['w']"}, {"path": ".other"}]) is None
