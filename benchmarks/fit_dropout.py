# KERAS_BACKEND=jax python benchmarks/fit_dropout.py            (about a minute on 2 CPU cores)
# KERAS_BACKEND=jax python benchmarks/fit_dropout.py --quick    (a smoke run)
"""Training throughput with dropout: jadam's Trainer.fit against keras.Model.fit.

The same model on both sides: Dense(32, relu) -> Dropout(0.2) -> Dense(1) on
breast_cancer (569 rows, 30 features), Adam(1e-3), batch 32, binary cross-entropy
from logits, shuffled every epoch; jadam trains ``jadam.MLP((32, 1), dropout=0.2)``.
A second row adds batch normalization (``batch_norm=True``; Keras:
Dense -> BatchNormalization -> relu -> Dropout -> Dense).

Method: each contender runs once untimed (compilation), then rounds are interleaved
(jadam, keras, jadam, ...) because these machines drift; we report the median
samples/s over rounds and the ratio from the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow (not installed)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jadam  # noqa: E402

BATCH = 32  # the Keras tutorial's batch size
RATE = 0.2  # dropout rate


def data():
    ds = jadam.datasets.load("breast_cancer")
    x = np.concatenate([ds.x_train, ds.x_test]).astype(np.float32)
    y = np.concatenate([ds.y_train, ds.y_test]).astype(np.float32)
    return x, y


def build_jadam(x, y, batch_norm):
    model = jadam.MLP((32, 1), dropout=RATE, batch_norm=batch_norm)
    trainer = jadam.Trainer(model, "adam", loss="binary_crossentropy", metrics=())
    xd = jax.device_put(x)  # placed once, as Keras keeps its NumPy arrays

    def run(epochs):
        trainer.fit(xd, y, batch_size=BATCH, epochs=epochs, verbose=0)
        return epochs * len(x)

    return run


def build_keras(x, y, batch_norm):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((x.shape[1],)), keras.layers.Dense(32)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.Activation("relu"), keras.layers.Dropout(RATE), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    yk = y[:, None]

    def run(epochs):
        model.fit(x, yk, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)
        return epochs * len(x)

    return run


def bench(batch_norm, epochs, rounds):
    x, y = data()
    runs = {"jadam": build_jadam(x, y, batch_norm), "keras": build_keras(x, y, batch_norm)}
    for run in runs.values():
        run(1)  # compile, untimed
    rates = {k: [] for k in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            t = time.perf_counter()
            n = runs[name](epochs)
            rates[name].append(n / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and epochs")
    args = ap.parse_args()
    epochs, rounds = (2, 3) if args.quick else (10, 7)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.default_backend()}; breast_cancer, batch {BATCH}, "
          f"{epochs} epochs per round, {rounds} interleaved rounds, medians")  # fmt: skip
    print(f"{'model':<44} {'jadam samples/s':>16} {'keras samples/s':>16} {'ratio':>7}")
    for batch_norm in (False, True):
        med = bench(batch_norm, epochs, rounds)
        name = (
            "Dense(32)-" + ("BatchNorm-" if batch_norm else "") + f"relu-Dropout({RATE})-Dense(1)"
        )
        ratio = med["jadam"] / med["keras"]
        print(f"{name:<44} {med['jadam']:>16,.0f} {med['keras']:>16,.0f} {ratio:>6.1f}x")


if __name__ == "__main__":
    main()
