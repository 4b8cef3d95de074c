"""The ``jadam`` command: train, evaluate and predict from the shell.

    jadam train                                  # Dense 32 relu -> 1, Adam 1e-3, batch 32,
                                                 # 50 epochs on breast_cancer
    jadam train --data digits --layers 64 --epochs 30 --out runs/digits
    jadam train --data my.csv --target label --optimizer adamw --lr 3e-3 --weight-decay 1e-4
    jadam train --data digits --moments q8       # Adam's moments in 8 bits (bf16: 16 bits)
    jadam train --lr-schedule warmup-cosine --lr-schedule-options '{"warmup_steps": 50}' \
        --global-clipnorm 1.0 --gradient-accumulation-steps 4
    jadam evaluate runs/digits                   # the run's own test split
    jadam evaluate runs/mine --data other.csv    # a file with the same columns
    jadam predict runs/mine --input new.csv --output predictions.csv

Several devices and processes (data parallel on JAX's SPMD; the batch is split over
every device, so ``--batch-size`` must be a multiple of the device count):

    jadam train ...                              # every device of one host: automatic
    jadam train ... --zero1                      # + optimizer state split over devices
    # N processes (hosts): the same command on each, with its own --process-id
    jadam train ... --coordinator 10.0.0.1:1234 --num-processes N --process-id I
    jadam train ... --distributed                # Cloud TPU pod / Slurm / Open MPI:
                                                 # JAX detects the processes itself

A run folder holds ``checkpoint/`` (``jadam.Trainer.load``), ``model.jaxexport`` (+
``.json``; ``jadam.load_exported``), ``history.json``, ``curves.png``, ``data.json``
(feature names, standardization fitted on the training split, classes) and
``metrics.json`` (test loss and metrics). It is written to a temporary folder and
renamed at the end, so a failed run never leaves a half-written folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jadam", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write a run folder")
    t.add_argument(
        "--data",
        default="breast_cancer",
        help="built-in name (breast_cancer, digits, iris, wine) or a .csv/.npy/.npz path",
    )
    t.add_argument("--target", default=None, help="label column of a data file")
    t.add_argument(
        "--task",
        choices=("classification", "regression"),
        default=None,
        help="what the labels are (default: detected; 0/1 or up to 50 non-negative integers "
        "or any text are classes, other numbers, e.g. -1/0/1, regression)",
    )
    t.add_argument(
        "--layers",
        default="32",
        help="hidden layer sizes, comma-separated (the output layer is added)",
    )
    t.add_argument("--activation", default="relu")
    optimizers = (
        "adam", "adamw", "amsgrad", "amsgradw", "adamax", "adamaxw", "nadam", "nadamw",
        "radam", "radamw", "adabelief", "lamb", "yogi", "adan", "adopt", "ademamix",
        "schedule_free_adamw",
    )  # fmt: skip
    t.add_argument(
        "--optimizer", default="adam", choices=optimizers, metavar="NAME",
        help="one of " + ", ".join(optimizers),
    )  # fmt: skip
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--b1", type=float, default=None)
    t.add_argument("--b2", type=float, default=None)
    t.add_argument("--eps", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None, help="for adamw / nadamw")
    t.add_argument(
        "--moments",
        choices=("float32", "bf16", "q8"),
        default="float32",
        help="how the optimizer stores its moments: float32 (8 bytes per parameter), "
        "bf16 with stochastic rounding (4) or blockwise 8-bit q8 (about 2; leaves under "
        "4,096 entries stay float32)",
    )
    t.add_argument("--l2", type=float, default=0.0, help="L2 penalty on kernels, in the loss")
    c = t.add_argument_group("training controls")
    c.add_argument("--clipnorm", type=float, default=None, help="clip each gradient leaf's norm")
    c.add_argument("--global-clipnorm", type=float, default=None, help="clip the global norm")
    c.add_argument(
        "--gradient-accumulation-steps", type=int, default=None, metavar="N",
        help="average the gradients of N batches per update",
    )  # fmt: skip
    c.add_argument(
        "--lr-schedule", default=None,
        choices=("constant", "cosine", "warmup-cosine", "exponential", "piecewise"),
        help="learning-rate schedule from --lr (warmup-cosine: peaks at --lr) over the run's "
        "updates; the step counts in --lr-schedule-options",
    )  # fmt: skip
    c.add_argument(
        "--lr-schedule-options", default=None, metavar="JSON",
        help="the schedule's optax options, e.g. '{\"warmup_steps\": 100}' (warmup-cosine), "
        "'{\"decay_rate\": 0.5}' (exponential), '{\"boundaries_and_scales\": {\"500\": 0.1}}' "
        "(piecewise); decay_steps / transition_steps default to the run's length",
    )  # fmt: skip
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--test-fraction", type=float, default=0.2)
    t.add_argument("--out", default=None, help="run folder (default runs/<data>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    d = t.add_argument_group(
        "several devices and processes",
        "With more than one device (all local GPUs/TPU cores, or every device of every "
        "process after --coordinator/--distributed), training is data parallel: each batch "
        "is split over the devices, parameters are replicated, gradients are all-reduced "
        "by XLA; --batch-size must be a multiple of the device count and gives the same "
        "training as on one device. Several processes run the same command with the same "
        "data and --seed; process 0 prints and writes the run folder (--out must be on a "
        "file system process 0 can write). "
        "CPU (tests, loopback): jadam train ... --coordinator 127.0.0.1:1234 "
        "--num-processes 2 --process-id 0 (and --process-id 1 in a second shell). "
        "GPU cluster, one process per host seeing all its GPUs: jadam train ... "
        "--coordinator HOST0:1234 --num-processes HOSTS --process-id RANK on each host "
        "(NCCL; or one process per GPU with CUDA_VISIBLE_DEVICES set per process); under "
        "Slurm or Open MPI (srun/mpirun) use --distributed instead. "
        "TPU pod slice: run jadam train ... --distributed on every host, e.g. "
        "gcloud compute tpus tpu-vm ssh NAME --worker=all --command='jadam train ... "
        "--distributed'.",
    )
    d.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT",
        help="address of process 0 (the same on every process); with --num-processes and "
        "--process-id",
    )  # fmt: skip
    d.add_argument("--num-processes", type=int, default=None, help="how many processes in all")
    d.add_argument("--process-id", type=int, default=None, help="this process: 0 .. N-1")
    d.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process run that JAX detects (Cloud TPU pod, Slurm, Open MPI)",
    )  # fmt: skip
    d.add_argument(
        "--init-timeout", type=float, default=60.0, metavar="SECONDS",
        help="how long to wait for every process to join before giving up with a message "
        "naming the coordinator and the missing processes (exit status 2)",
    )  # fmt: skip
    d.add_argument(
        "--zero1", action="store_true",
        help="split the optimizer state over the devices (ZeRO-1): each stores 1/N of it",
    )  # fmt: skip

    e = sub.add_parser("evaluate", help="loss and metrics of a trained run on data")
    e.add_argument("run")
    e.add_argument(
        "--data",
        default=None,
        help="built-in name (its test split) or a file; default: the run's test split",
    )
    e.add_argument("--target", default=None, help="label column (default: the run's)")
    e.add_argument("--batch-size", type=int, default=256)

    r = sub.add_parser("predict", help="predict a CSV of inputs with a run's exported model")
    r.add_argument("run")
    r.add_argument("--input", required=True, help="CSV with the training feature columns")
    r.add_argument("--output", default=None, help="CSV to write (default: stdout)")
    _add_find_lr(sub, t)
    return p  # fmt: skip


# The options `jadam find-lr` shares with `jadam train` (the same data, model and
# optimizer); the train parser's own definitions are reused, so they cannot drift.
_FIND_LR_SHARED = (
    "data", "target", "task", "layers", "activation", "optimizer", "b1", "b2", "eps",
    "weight_decay", "moments", "l2", "batch_size", "seed", "val_fraction", "test_fraction",
)  # fmt: skip


def _add_find_lr(sub, train: argparse.ArgumentParser) -> None:
    f = sub.add_parser(
        "find-lr",
        help="the learning-rate range test: suggest a learning rate, plot loss against rate",
        description="Train a copy of the model for --steps batches at rates growing "
        "exponentially from --start to --end (stopping once the smoothed loss exceeds 4x "
        "its best), print the suggested rate (the steepest descent of the smoothed loss) "
        "and write the plot. Data, model and optimizer options are those of jadam train.",
    )
    for action in train._actions:
        if action.dest in _FIND_LR_SHARED:
            f._add_action(action)
    f.add_argument("--start", type=float, default=1e-7, help="first learning rate")
    f.add_argument("--end", type=float, default=10.0, help="last learning rate")
    f.add_argument("--steps", type=int, default=200, help="batches in the sweep")
    f.add_argument("--smoothing", type=float, default=0.98, help="of the loss's moving average")
    f.add_argument("--plot", default="lr_finder.png", help="PNG to write (loss against rate)")
    # Every other train option at its default, for the helpers shared with `_train`.
    own = {a.dest for a in f._actions}
    f.set_defaults(**{a.dest: a.default for a in train._actions if a.dest not in own})


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        _join_processes(parser, args)  # first: before anything touches a device
    try:
        commands = {"train": _train, "evaluate": _evaluate, "predict": _predict,
                    "find-lr": _find_lr}  # fmt: skip
        return commands[args.command](args)
    except (OSError, ValueError) as e:
        # Bad input, a damaged run folder (CheckpointError is a ValueError), a file that
        # cannot be read or written: one line. Anything else is a bug: its traceback.
        print(f"jadam {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:  # raised by the OS: "[Errno 28] ..." reworded
        msg = e.strerror
        if e.filename is not None:
            msg += f": {os.fsdecode(e.filename)}"
        if e.filename2 is not None:
            msg += f" -> {os.fsdecode(e.filename2)}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _join_processes(parser: argparse.ArgumentParser, args) -> None:
    """``jax.distributed`` for --coordinator/--num-processes/--process-id or --distributed."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if args.distributed and any(v is not None for v in given):
        parser.error("--distributed detects the processes itself: do not combine it with "
                     "--coordinator, --num-processes or --process-id")  # fmt: skip
    if not args.distributed and all(v is None for v in given):
        return
    from jadam._sharding import PeerMismatchError, init_distributed

    def flags(msg: str) -> str:
        for name, flag in (("coordinator_bind_address", "--coordinator"),
                           ("coordinator_address", "--coordinator"),
                           ("num_processes", "--num-processes"),
                           ("process_id", "--process-id"),
                           ("init_timeout", "--init-timeout")):  # fmt: skip
            msg = msg.replace(name, flag)
        return msg.replace("init_distributed: ", "")

    try:
        if args.distributed:
            init_distributed(init_timeout=args.init_timeout)
        else:
            init_distributed(args.coordinator, args.num_processes, args.process_id,
                             init_timeout=args.init_timeout)  # fmt: skip
    except PeerMismatchError as e:  # another process's command line differs
        parser.exit(2, f"jadam train: error: {flags(str(e))}\n")
    except ValueError as e:
        parser.error(flags(str(e)))
    except OSError as e:  # TimeoutError included: peers missing, port in use
        parser.exit(2, f"jadam train: error: {flags(str(e))}\n")
    except RuntimeError as e:
        parser.error(f"cannot join the processes: {e}")
    if args.distributed or args.num_processes > 1:
        _end_at_once_on_collective_errors(args.coordinator)


def _end_at_once_on_collective_errors(coordinator: str | None) -> None:
    """After joining: an exception escaping ``main`` ends this process at once.

    A collective that fails (a ``JaxRuntimeError``, e.g. gloo's "Connection reset by
    peer" when another process died) gets one line; anything else its traceback. Then
    the process exits without JAX's shutdown at exit, which would wait for the dead
    process until the heartbeat timeout and abort with a C++ stack trace. By then the
    exception has unwound ``_train``: the temporary run folder is already removed.
    """
    import jax

    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, jax.errors.JaxRuntimeError):
            first = (str(value).strip().splitlines() or [kind.__name__])[0]
            try:
                who = f"process {jax.process_index()} of {jax.process_count()}"
            except Exception:  # the runtime itself failed: say what is known
                who = "this process"
            where = f" (coordinator {coordinator})" if coordinator else ""
            print(f"jadam train: error: {who} stopped: {first}. Another process probably died "
                  f"or became unreachable{where}; a run folder is only written whole, at the "
                  "end, so nothing was saved.", file=sys.stderr)  # fmt: skip
        else:
            previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if isinstance(value, jax.errors.JaxRuntimeError) else 1)

    sys.excepthook = hook


def _optimizer_options(args) -> dict:
    opts = {"learning_rate": args.lr}
    for name in ("b1", "b2", "eps"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.weight_decay is not None:
        opts["weight_decay"] = args.weight_decay
    if args.moments == "q8":
        opts["mu_dtype"] = opts["nu_dtype"] = "q8"
    elif args.moments == "bf16":
        from jadam import StochasticRounding

        opts["mu_dtype"] = opts["nu_dtype"] = StochasticRounding("bfloat16", seed=args.seed)
    return opts


def _training_controls(args, n_train: int) -> dict:
    """Clipping, accumulation and the learning-rate schedule, as optimizer options."""
    opts = {}
    for name in ("clipnorm", "global_clipnorm", "gradient_accumulation_steps"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.lr_schedule_options is not None and args.lr_schedule is None:
        raise ValueError("--lr-schedule-options needs --lr-schedule")
    if args.lr_schedule is not None:
        from jadam.train.schedules import run_schedule

        extra = {}
        if args.lr_schedule_options is not None:
            try:
                extra = json.loads(args.lr_schedule_options)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lr-schedule-options is not valid JSON: {e}") from None
            if not isinstance(extra, dict):
                raise ValueError("--lr-schedule-options must be a JSON object {...}")
        per_epoch = -(-n_train // max(args.batch_size, 1))
        updates = per_epoch * max(args.epochs, 0) // (args.gradient_accumulation_steps or 1)
        try:
            opts["learning_rate"] = run_schedule(args.lr_schedule, args.lr, updates, extra)
        except ValueError as e:
            raise ValueError(f"--lr-schedule {args.lr_schedule}: {e}") from None
    return opts


def _hidden_layers(layers: str) -> list[int]:
    """`--layers 64,32` as sizes, each >= 1."""
    try:
        hidden = [int(s) for s in layers.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {layers!r}") from None
    if any(h < 1 for h in hidden):
        raise ValueError(f"--layers sizes must be >= 1, got {layers!r}")
    return hidden


def _write_whole(path: str, write) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`:
    the file is replaced only once complete, and nothing is left behind on failure."""
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp"
    )
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _train(args) -> int:
    import jax

    from jadam.train import datasets
    from jadam.train.checkpoint import check_writable, not_ours, replace_dir, run_marker
    from jadam.train.models import MLP
    from jadam.train.trainer import Trainer

    hidden = _hidden_layers(args.layers)
    out = args.out or os.path.join(
        "runs",
        f"{os.path.splitext(os.path.basename(args.data))[0]}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    if os.path.lexists(out) and not args.overwrite:
        raise ValueError(f"run folder {out} exists; choose another --out or pass --overwrite")
    if os.path.lexists(out) and (reason := not_ours(out, "run folder")):
        raise ValueError(
            f"{out} exists and is not a jadam run folder ({reason}); not overwriting it"
        )
    check_writable(out, "run folder")  # before training: fail fast, not after it

    # One device: as always. Several (local, or of every process): data parallel.
    mesh = None
    if jax.device_count() > 1 or args.zero1:
        from jadam._sharding import data_parallel_mesh

        mesh = data_parallel_mesh()
    main_process = jax.process_index() == 0  # prints and writes; all processes train

    # Everything is checked before any training step.
    ds = datasets.load(
        args.data, target=args.target, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, task=args.task,
    )  # fmt: skip
    model = MLP(features=(*hidden, ds.n_outputs), activation=args.activation)
    options = {**_optimizer_options(args), **_training_controls(args, len(ds.x_train))}
    trainer = Trainer(
        model, args.optimizer, loss=ds.loss, metrics=ds.metrics,
        optimizer_options=options, l2=args.l2, seed=args.seed,
        mesh=mesh, zero1=args.zero1,
    )  # fmt: skip
    validation = (ds.x_val, ds.y_val) if len(ds.x_val) else None
    verbose = args.verbose if main_process else 0
    if verbose:
        where = jax.default_backend()
        if mesh is not None:
            where += f" x {jax.device_count()} devices"
            where += f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
            where += ", ZeRO-1" if args.zero1 else ""
        print(
            f"jadam train: {ds.name} ({len(ds.x_train)} train / {len(ds.x_val)} val / "
            f"{len(ds.x_test)} test), MLP {list(model.features)} {args.activation}, "
            f"{args.optimizer} lr={args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
            f"{where}"
        )
        print(f"jadam train: task {_task_line(ds, args.task)}")
    history = trainer.fit(
        ds.x_train, ds.y_train, batch_size=args.batch_size, epochs=args.epochs,
        validation_data=validation, verbose=verbose,
    )  # fmt: skip
    test = trainer.evaluate(ds.x_test, ds.y_test)
    data_info = {
        "data": args.data if ds.name in datasets.BUILTIN else os.path.abspath(args.data),
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        **ds.scaler(),
    }

    def write(tmp: str) -> None:
        trainer.save(os.path.join(tmp, "checkpoint"))
        trainer.export(os.path.join(tmp, "model.jaxexport"), metadata=data_info)
        history.save(os.path.join(tmp, "history.json"))
        history.plot(os.path.join(tmp, "curves.png"))
        with open(os.path.join(tmp, "data.json"), "w") as f:
            json.dump(data_info, f, indent=1)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump({"test_" + k: v for k, v in test.items()}, f, indent=1)
        with open(os.path.join(tmp, "run.json"), "w") as f:  # last: marks it complete
            json.dump(run_marker(), f, indent=1)

    if not main_process:
        trainer.save(os.path.join(out, "checkpoint"))  # its part of the collective save only
        return 0
    replace_dir(out, write, "run folder")  # checks again: replaces only a run folder
    print("test " + " - test ".join(f"{k}: {v:.4f}" for k, v in test.items()))
    print(f"run folder: {out}")
    return 0


def _find_lr(args) -> int:
    from jadam.train import datasets
    from jadam.train.models import MLP
    from jadam.train.trainer import Trainer

    hidden = _hidden_layers(args.layers)
    if not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot {args.plot} must name a .png file")
    _check_output(args.plot, "--plot")  # before the work, not after it
    ds = datasets.load(
        args.data, target=args.target, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, task=args.task,
    )  # fmt: skip
    model = MLP(features=(*hidden, ds.n_outputs), activation=args.activation)
    trainer = Trainer(
        model, args.optimizer, loss=ds.loss, metrics=ds.metrics,
        optimizer_options=_optimizer_options(args), l2=args.l2, seed=args.seed,
    )  # fmt: skip
    res = trainer.find_lr(
        ds.x_train, ds.y_train, start=args.start, end=args.end, steps=args.steps,
        batch_size=args.batch_size, smoothing=args.smoothing,
    )  # fmt: skip
    _write_whole(args.plot, res.plot)
    stop = "stopped when the loss diverged" if res.diverged else "did not diverge"
    print(
        f"jadam find-lr: {ds.name}, MLP {list(model.features)} {args.activation}, "
        f"{args.optimizer}, batch {args.batch_size}: {len(res.lrs)} steps from "
        f"{res.lrs[0]:.3g} to {res.lrs[-1]:.3g} ({stop})"
    )
    how = "steepest descent of the smoothed loss" if res.rule == "steepest" else (
        "a tenth of the rate of the lowest loss"
    )  # fmt: skip
    print(f"suggested learning rate: {res.suggestion:.3g} ({how}; "
          f"lowest loss / 10: {res.min_div_10:.3g})")  # fmt: skip
    print(f"plot: {args.plot}")
    return 0


def _task_line(ds, chosen: str | None) -> str:
    """What the labels were taken as, and how to choose otherwise."""
    line = ds.task
    if ds.classes is not None:
        n = len(ds.classes)
        line += f", classes {ds.classes}" if n <= 10 else f", {n} classes"
    if chosen:
        return f"{line} (--task {chosen})"
    other = "regression" if ds.classes is not None else "classification"
    return f"{line} (detected; --task {other} to read the labels as {other})"


_RUN_TASKS = ("binary", "multiclass", "regression")


def _read_run(run: str, *, split: bool = False) -> dict:
    """A run folder's data.json, checked; ``split``: also what re-creates its split.

    A missing, garbled or inconsistent file is a ValueError naming it and the field.
    """
    path = os.path.join(run, "data.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run} is not a jadam run folder (no data.json)")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 JSON: the run folder is damaged") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}): the run folder is damaged"
        ) from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a JSON object: the run folder is damaged")
    needed = ["feature_names", "target", "task", "mean", "std"]
    needed += ["data", "seed", "val_fraction", "test_fraction"] if split else []
    missing = [k for k in needed if k not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing}: the run folder is damaged")

    def bad(field: str, want: str):
        value = repr(info.get(field))
        value = value if len(value) <= 60 else value[:57] + "..."
        return ValueError(f"{path}: {field} must be {want}, got {value}")

    from jadam.train.datasets import column_key

    def names(v) -> bool:
        return isinstance(v, list) and all(isinstance(n, str) for n in v)

    feats = info["feature_names"]
    if not names(feats) or not feats or len({column_key(n) for n in feats}) != len(feats):
        raise bad("feature_names", "a list of distinct column names")
    if not isinstance(info["target"], str):
        raise bad("target", "a column name")
    if info["task"] not in _RUN_TASKS:
        raise bad("task", f"one of {list(_RUN_TASKS)}")
    for field in ("mean", "std"):
        v = info[field]
        if not (
            isinstance(v, list)
            and len(v) == len(feats)
            and all(isinstance(a, int | float) and not isinstance(a, bool) for a in v)
            and np.all(np.isfinite(v))
            and (field == "mean" or min(v) > 0)
        ):
            want = "positive" if field == "std" else "finite"
            raise bad(field, f"a list of {len(feats)} {want} numbers (one per feature)")
    classes = info.get("classes")
    if info["task"] != "regression":
        n = "2" if info["task"] == "binary" else "at least 2"
        if not (
            isinstance(classes, list)
            and all(isinstance(c, str | int) and not isinstance(c, bool) for c in classes)
            and len({str(c) for c in classes}) == len(classes)
            and (len(classes) == 2 if info["task"] == "binary" else len(classes) >= 2)
        ):
            raise bad("classes", f"a list of {n} distinct class labels for task {info['task']}")
    columns = info.get("columns")
    if columns is not None and (not names(columns) or len(columns) != len(feats) + 1):
        raise bad("columns", f"null or a list of {len(feats) + 1} column names")
    if split:
        if not isinstance(info["data"], str):
            raise bad("data", "a data set name or path")
        if not isinstance(info["seed"], int) or isinstance(info["seed"], bool):
            raise bad("seed", "an integer")
        for field in ("val_fraction", "test_fraction"):
            v = info[field]
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
                raise bad(field, "a number in [0, 1)")
    return info


def _evaluate(args) -> int:
    from jadam.train import datasets
    from jadam.train.trainer import Trainer

    info = _read_run(args.run, split=args.data is None or args.data in datasets.BUILTIN)
    trainer = Trainer.load(os.path.join(args.run, "checkpoint"))
    data = args.data or info["data"]
    if data in datasets.BUILTIN or (args.data is None):
        ds = datasets.load(
            data, target=info["target"] if data not in datasets.BUILTIN else None,
            seed=info["seed"], val_fraction=info["val_fraction"],
            test_fraction=info["test_fraction"],
            task="regression" if info["task"] == "regression" else "classification",
        )  # fmt: skip
        if ds.feature_names != info["feature_names"]:
            raise ValueError(f"{data} has other features than the run was trained on")
        # Same data, seed and fractions: the same split and training-split standardization.
        if not np.allclose(ds.mean, info["mean"], rtol=1e-5, atol=1e-6):
            raise ValueError(f"{data} does not reproduce the run's training split")
        x, y, what = ds.x_test, ds.y_test, f"{data} (test split)"
    elif os.path.splitext(data)[1].lower() == ".csv":
        # By name (case, spaces, _ and - ignored) in any order; extra or missing: an error.
        x_raw, y_raw = datasets.read_labelled_csv(
            data, info["feature_names"], args.target or info["target"],
            columns=info.get("columns") if args.target is None else None,
        )  # fmt: skip
        x, y, what = _standardize(x_raw, info), _labels(y_raw, info), data
    else:
        target = args.target or info["target"]
        x_raw, y_raw, feats, _ = datasets.read_table(data, target)
        if feats != info["feature_names"]:
            raise ValueError(
                f"{data} columns {feats} differ from the run's {info['feature_names']}"
            )
        x, y, what = _standardize(x_raw, info), _labels(y_raw, info), data
    res = trainer.evaluate(x, y, batch_size=args.batch_size)
    print(f"{what}: " + " - ".join(f"{k}: {v:.4f}" for k, v in res.items()))
    return 0


def _standardize(x_raw: np.ndarray, info: dict) -> np.ndarray:
    mean = np.asarray(info["mean"], np.float32)
    std = np.asarray(info["std"], np.float32)
    return ((np.asarray(x_raw, np.float32) - mean) / std).astype(np.float32)


def _labels(y_raw: np.ndarray, info: dict) -> np.ndarray:
    classes = info.get("classes")
    if info["task"] == "regression":
        if np.asarray(y_raw).dtype.kind not in "biuf":
            raise ValueError(
                f"the run is a regression, but target {info['target']!r} holds text such "
                f"as {str(y_raw[0])!r}"
            )
        return np.asarray(y_raw, np.float32)
    y_num = np.asarray(y_raw)
    if y_num.dtype.kind in "biuf" and not all(isinstance(c, int | float) for c in classes):
        # Named classes (e.g. built-in data) given as their integer indices.
        if np.all(y_num == np.round(y_num)) and y_num.min() >= 0 and y_num.max() < len(classes):
            return y_num.astype(np.int32)
    lookup = {str(c): i for i, c in enumerate(classes)}
    lookup.update({str(float(c)): i for i, c in enumerate(classes) if isinstance(c, int | float)})
    out = []
    for v in y_raw:
        key = str(v)
        if key not in lookup and isinstance(v, float | np.floating) and float(v).is_integer():
            key = str(int(v))
        if key not in lookup:
            raise ValueError(f"label {v!r} is not one of the run's classes {classes}")
        out.append(lookup[key])
    return np.asarray(out, np.int32)


def _predict(args) -> int:
    from jadam.train import datasets, load_exported

    info = _read_run(args.run)
    if args.output is not None:
        _check_output(args.output)  # before the work, not after it
    model = load_exported(os.path.join(args.run, "model.jaxexport"))  # no model code needed
    task, classes = info["task"], info.get("classes")
    width = len(classes) if task == "multiclass" else 1
    if list(model.output_shape) != [width]:
        raise ValueError(
            f"{args.run}: data.json describes {width} outputs ({task}), but model.jaxexport "
            f"gives {list(model.output_shape)}: the run folder is damaged"
        )
    x_raw = datasets.read_features_csv(
        args.input, info["feature_names"], target=info["target"], columns=info.get("columns")
    )
    probs = np.asarray(model(_standardize(x_raw, info)))
    if task == "binary":
        p = probs.reshape(len(probs), -1)[:, 0]
        header = ["probability", "label"]
        rows = [[f"{v:.6g}", classes[int(v > 0.5)]] for v in p]
    elif task == "multiclass":
        header = [f"p_{c}" for c in classes] + ["label"]
        rows = [[f"{v:.6g}" for v in row] + [classes[int(np.argmax(row))]] for row in probs]
    else:
        header = ["prediction"]
        rows = [[f"{v:.6g}"] for v in probs.reshape(len(probs), -1)[:, 0]]
    if args.output is None:
        w = csv.writer(sys.stdout)
        w.writerow(header)
        w.writerows(rows)
        return 0
    _write_csv(args.output, header, rows)
    print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0


def _check_output(path: str, flag: str = "--output") -> None:
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: folder {parent} does not exist")


def _write_csv(path: str, header: list, rows: list) -> None:
    """Write a CSV whole or not at all: a regular file is replaced only once complete.

    Anything else at ``path`` (``/dev/stdout``, a pipe) is written to directly.
    """

    def write(target: str) -> None:
        with open(target, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    if os.path.exists(path) and not os.path.isfile(path):
        write(path)
    else:
        _write_whole(path, write)


if __name__ == "__main__":
    sys.exit(main())
