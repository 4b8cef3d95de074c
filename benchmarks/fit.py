# KERAS_BACKEND=jax python benchmarks/fit.py            (about 3 minutes on 2 CPU cores)
# KERAS_BACKEND=jax python benchmarks/fit.py --quick    (a smoke run)
"""Training throughput: jadam's Trainer.fit against what people use today.

Contenders, on the same MLPs and data, timed in ONE process:
  jadam   jadam.Trainer(...).fit(...)                    (jadam.adam; one lax.scan per epoch)
  scan    a hand-written Flax + optax.adam loop whose whole epoch is one jitted
          lax.scan over NumPy-shuffled indices, state donated (what an expert writes)
  keras   keras.Model.fit on the JAX backend (keras.optimizers.Adam)
  torch   a plain PyTorch loop with torch.optim.Adam

Rows: the classic 30-32-1 classifier on breast_cancer (569 rows) at batch 32 and 256,
and a 784-512-512-10 classifier on synthetic 60,000x784 data at batch 128.

Method: each contender is built and run once untimed (compilation; its time is
reported apart), then rounds are interleaved (jadam, scan, keras, torch, jadam, ...)
because these machines drift; we report the median samples/s over rounds and ratios
from the same run. The compute ceiling is the GFLOP/s of a large jitted float32
matmul measured in the same run; a model's fraction of it is
samples/s * 6 * parameters / ceiling (forward 2, backward 4 FLOPs per weight).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow (not installed)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _machine import describe  # noqa: E402

import jadam  # noqa: E402


def ceiling_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a big jitted matmul: the most this machine's XLA can do."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def shuffle_cost(n: int = 100_000, reps: int = 20) -> tuple[float, float]:
    """ms per shuffle of n indices: jax.random.permutation (jitted) vs a NumPy permutation."""
    perm = jax.jit(lambda k: jax.random.permutation(k, n))
    key = jax.random.key(0)
    perm(key).block_until_ready()
    t = time.perf_counter()
    for i in range(reps):
        perm(jax.random.fold_in(key, i)).block_until_ready()
    t_jax = (time.perf_counter() - t) / reps
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(reps):
        rng.permutation(n).astype(np.int32)
    t_np = (time.perf_counter() - t) / reps
    return t_jax * 1e3, t_np * 1e3


# ----------------------------------------------------------------------------- data


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    b = load_breast_cancer()
    x = b.data.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), b.target.astype(np.float32), "binary"


def synthetic(n=60_000, d=784, k=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, k)).astype(np.float32)
    return x, np.argmax(x @ w, 1).astype(np.int32), "multiclass"


# ----------------------------------------------------------------------------- contenders
# Each builder returns run(epochs) -> samples processed; the first call compiles.


def build_jadam(x, y, task, features, batch):
    loss = "binary_crossentropy" if task == "binary" else "sparse_categorical_crossentropy"
    trainer = jadam.Trainer(jadam.MLP(features), "adam", loss=loss, metrics=())
    # Placed on the device once, like the hand-written loop's data (fit accepts jax
    # arrays as they are; NumPy input would be copied to the device on every fit call).
    xd = jax.device_put(x)

    def run(epochs):
        trainer.fit(xd, y, batch_size=batch, epochs=epochs, verbose=0)
        return epochs * len(x)

    return run


def build_scan(x, y, task, features, batch):
    model = jadam.MLP(features)
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        z = model.apply({"params": p}, xb)
        if task == "binary":
            return optax.sigmoid_binary_cross_entropy(z[:, 0], yb).mean()
        return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean()

    @jax.jit
    def epoch(params, opt_state, x, y, idx):
        def body(carry, rows):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p, x[rows], y[rows])
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, losses.mean()

    epoch = jax.jit(epoch.__wrapped__, donate_argnums=(0, 1))
    xd, yd = jax.device_put(x), jax.device_put(y)
    state = {"p": params, "o": opt_state}
    rng = np.random.default_rng(0)
    steps = len(x) // batch  # the usual hand-written choice: drop the last partial batch

    def run(epochs):
        for _ in range(epochs):
            idx = rng.permutation(len(x))[: steps * batch].reshape(steps, batch).astype(np.int32)
            state["p"], state["o"], loss = epoch(state["p"], state["o"], xd, yd, idx)
            float(loss)  # metrics to the host once per epoch, like the trainer
        return epochs * steps * batch

    return run


def build_keras(x, y, task, features, batch):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((x.shape[1],))]
    layers += [keras.layers.Dense(f, activation="relu") for f in features[:-1]]
    layers += [keras.layers.Dense(features[-1])]
    model = keras.Sequential(layers)
    loss = (
        keras.losses.BinaryCrossentropy(from_logits=True)
        if task == "binary"
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    yk = y[:, None] if task == "binary" else y

    def run(epochs):
        model.fit(x, yk, batch_size=batch, epochs=epochs, verbose=0, shuffle=True)
        return epochs * len(x)

    return run


def build_torch(x, y, task, features, batch):
    import torch

    torch.manual_seed(0)
    dims = [x.shape[1], *features]
    mods = []
    for i in range(len(features)):
        mods.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(features) - 1:
            mods.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(x)
    if task == "binary":
        yt = torch.from_numpy(y)[:, None]
        lossf = torch.nn.BCEWithLogitsLoss()
    else:
        yt = torch.from_numpy(y.astype(np.int64))
        lossf = torch.nn.CrossEntropyLoss()

    def run(epochs):
        for _ in range(epochs):
            perm = torch.randperm(len(xt))
            total = torch.zeros(())
            for s in range(0, len(xt), batch):
                rows = perm[s : s + batch]
                opt.zero_grad(set_to_none=True)
                loss = lossf(model(xt[rows]), yt[rows])
                loss.backward()
                opt.step()
                total += loss.detach()
            float(total)
        return epochs * len(xt)

    return run


BUILDERS = {"jadam": build_jadam, "scan": build_scan, "keras": build_keras, "torch": build_torch}


def bench_row(name, data, features, batch, epochs, rounds, contenders, torch_threads):
    import torch

    # torch's OpenMP threads spin-wait: on these 2 shared cores 2 threads ran the big model
    # at 624 samples/s and 1 thread at 20,600, so torch gets `torch_threads` (default 1).
    torch.set_num_threads(torch_threads)
    x, y, task = data
    runs, first = {}, {}
    for c in contenders:
        run = BUILDERS[c](x, y, task, features, batch)
        t = time.perf_counter()
        n = run(1)  # compiles (jit / XLA / torch warm-up) and runs one epoch
        first[c] = (time.perf_counter() - t, n)
        runs[c] = run
    rates = {c: [] for c in contenders}
    ceilings = []
    for r in range(rounds):  # interleaved, rotating who goes first: A B C D, B C D A, ...
        # (rotation: whoever runs right after torch or keras finds XLA's threads cold)
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            t = time.perf_counter()
            n = runs[c](epochs)
            rates[c].append(n / (time.perf_counter() - t))
        ceilings.append(ceiling_gflops(reps=3))
    params = sum(a * b + b for a, b in zip((x.shape[1], *features[:-1]), features, strict=True))
    rate = {c: statistics.median(v) for c, v in rates.items()}
    return {
        "row": name,
        "params": params,
        "rate": rate,
        # compile time: the first (compiling) epoch minus a steady epoch of the same size
        "compile": {c: max(first[c][0] - first[c][1] / rate[c], 0.0) for c in contenders},
        "ceilings": ceilings,
        "torch_threads": torch_threads,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and epochs")
    ap.add_argument("--contenders", default="jadam,scan,keras,torch")
    ap.add_argument("--rows", default="bc32,bc256,mlp784")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    contenders = args.contenders.split(",")
    q = args.quick
    import torch

    print(describe(f"torch {torch.__version__} ({args.torch_threads} thread(s))"))
    t_jax, t_np = shuffle_cost()
    print(f"# shuffle of 100k indices: jax.random.permutation {t_jax:.1f} ms, NumPy {t_np:.2f} ms")
    ceil_before = ceiling_gflops()
    bc = breast_cancer()
    # row: (title, data, layer sizes, batch, epochs per timed round, rounds)
    specs = {
        "bc32": ("breast_cancer 30-32-1, batch 32", bc, (32, 1), 32, 100, 3 if q else 8),
        "bc256": ("breast_cancer 30-32-1, batch 256", bc, (32, 1), 256, 300, 3 if q else 8),
        "mlp784": ("synthetic 60000x784, 784-512-512-10, batch 128", None, (512, 512, 10), 128,
                   1, 2 if q else 3),
    }  # fmt: skip
    results = []
    for key in args.rows.split(","):
        name, data, features, batch, epochs, rounds = specs[key]
        if data is None:
            data = synthetic(n=12_000 if q else 60_000)
        r = bench_row(name, data, features, batch, epochs, rounds, contenders, args.torch_threads)
        results.append(r)
        print(f"done: {name}: " + ", ".join(f"{c} {v:,.0f}/s" for c, v in r["rate"].items()),
              flush=True)  # fmt: skip
    # The ceiling: median over the matmul measurements interleaved with the rounds (each
    # the best of 3 back-to-back runs), like the medians of the throughputs it divides.
    all_ceil = [ceil_before] + [c for r in results for c in r["ceilings"]]
    ceil = statistics.median(all_ceil)

    n_ceil = 1 + sum(len(r["ceilings"]) for r in results)
    print(
        f"\nCompute ceiling (2048^3 f32 matmul, jitted; median of {n_ceil} measurements"
        f" interleaved with the rounds): {ceil:.1f} GFLOP/s (best {max(all_ceil):.1f})\n"
    )
    head = "| row | " + " | ".join(f"{c} samples/s" for c in contenders)
    head += (
        " | jadam/keras | jadam/scan | jadam/torch | fraction of ceiling ("
        + ", ".join(contenders)
        + ") | compile s ("
        + ", ".join(contenders)
        + ") |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        rate = r["rate"]
        ratio = lambda c, rate=rate: (
            f"{rate['jadam'] / rate[c]:.2f}x" if "jadam" in rate and c in rate else "-"
        )
        frac = ", ".join(f"{rate[c] * 6 * r['params'] / (ceil * 1e9):.2f}" for c in contenders)
        comp = ", ".join(f"{r['compile'][c]:.2f}" for c in contenders)
        cells = " | ".join(f"{rate[c]:,.0f}" for c in contenders)
        print(
            f"| {r['row']} | {cells} | {ratio('keras')} | {ratio('scan')} | {ratio('torch')} "
            f"| {frac} | {comp} |"
        )


if __name__ == "__main__":
    main()
