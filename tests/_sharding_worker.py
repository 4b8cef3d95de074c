"""Train a small Flax MLP data-parallel; the subprocess half of tests/test_sharding.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/_sharding_worker.py --out /tmp/r.npz --runs d1,d8,d8z,sd8,sd8z
    python tests/_sharding_worker.py --out /tmp/p0.npz --runs all,allz,sallz \
        --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0   # and id 1

A run tag is `d<K>` (the first K devices of this process) or `all` (every device
of every process), with an `s` prefix for the trainer's scan recipe (`sd8`; see `train`),
an `m` suffix for a (devices/2, 2) mesh ("data", "model") whose parameters are split
over "model" by user rules, and a `z` suffix for ZeRO-1 optimizer state. Every run trains
the same MLP from the same initial parameters on the same global batches; with
several processes, the step loop feeds each process's own rows of each batch
(`shard_local_batch`) and the scan recipe gives every process the whole index
array (`shard_batch`), of which each keeps its devices' columns. The output .npz
holds, per tag: the final parameters (as host arrays), the losses, and the
optimizer state's bytes on each local device and in total.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

GLOBAL_BATCH = 64  # divisible by 8 devices and by 2 processes
STEPS = 12
FEATURES = 16
HIDDEN = 32  # every kernel/bias dimension below is a multiple of 8, so ZeRO-1
OUTPUTS = 8  # can split every moment leaf: only the int32 count stays replicated


def make_data(steps: int = STEPS):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(steps, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    w = rng.normal(size=(FEATURES, OUTPUTS)).astype(np.float32)
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(steps, GLOBAL_BATCH, OUTPUTS)).astype(np.float32)
    return x, y.astype(np.float32)


def train(mesh, *, zero1: bool, steps: int = STEPS, local: bool = False, scan: bool = False):
    """Train; return the final parameters, losses and optimizer-state bytes.

    `scan=False`: one jitted step per batch (`jit_data_parallel`), batches fed
    with `shard_batch` (or, `local`, each process's rows with `shard_local_batch`).
    `scan=True`: the trainer's recipe (jadam/train/loop.py): the whole data set
    replicated on every device, ONE jitted `lax.scan` over a `(steps, batch)`
    array of row indices split over the data axis along dimension 1.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jadam

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(HIDDEN)(x))
            x = nn.relu(nn.Dense(HIDDEN)(x))
            return nn.Dense(OUTPUTS)(x)

    model = MLP()
    tx = jadam.adam(1e-2)
    # Same seed everywhere: every process builds the same initial parameters.
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))
    rep = jadam.replicated(mesh)
    if "model" in mesh.axis_names:
        # User rules: split each layer's output features over "model" (tensor
        # parallel), replicated over "data"; the batch is split over "data" only.
        param_sh = jax.tree.map(
            lambda p: NamedSharding(mesh, P(*[None] * (p.ndim - 1), "model")), params
        )
    else:
        param_sh = rep  # one sharding for every parameter (a tree prefix)
    opt_sh = jadam.state_shardings(tx, params, param_sh, zero1_axis="data" if zero1 else None)
    state_sh = (param_sh, opt_sh)

    def step(state, batch):
        params, opt_state = state
        x, y = batch

        def loss_fn(p):
            return jnp.mean((model.apply(p, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    init = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_sh)
    state = init(jadam.replicate(params, mesh))
    xs, ys = make_data(steps)
    if scan:
        return _report(*_train_scan(mesh, step, state_sh, state, xs, ys))

    step = jadam.jit_data_parallel(step, mesh, state_sh)
    n_proc, pid = jax.process_count(), jax.process_index()
    losses = []
    for t in range(steps):
        if local:  # this process's rows only
            rows = slice(pid * GLOBAL_BATCH // n_proc, (pid + 1) * GLOBAL_BATCH // n_proc)
            batch = jadam.shard_local_batch((xs[t, rows], ys[t, rows]), mesh)
        else:
            batch = jadam.shard_batch((xs[t], ys[t]), mesh)
        state, loss = step(state, batch)
        losses.append(loss)
    return _report(state, losses)


def _train_scan(mesh, step, state_sh, state, xs, ys):
    import jax

    import jadam

    rep = jadam.replicated(mesh)

    def chunk(state, x, y, idx):
        def body(state, rows):
            return step(state, (x[rows], y[rows]))  # rows split over "data": so is the batch

        return jax.lax.scan(body, state, idx)

    chunk = jax.jit(
        chunk,
        in_shardings=(state_sh, rep, rep, jadam.batch_sharding(mesh, batch_dim=1)),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    x, y = jadam.replicate((xs.reshape(-1, FEATURES), ys.reshape(-1, OUTPUTS)), mesh)
    # The same batches as the step loop, in the same order (no shuffling here).
    idx = np.arange(xs.shape[0] * GLOBAL_BATCH, dtype=np.int32).reshape(-1, GLOBAL_BATCH)
    state, losses = chunk(state, x, y, jadam.shard_batch(idx, mesh, batch_dim=1))
    return state, list(jadam.to_host(losses))


def _report(state, losses):
    import jax

    import jadam

    params, opt_state = state
    per_device = jadam.bytes_per_device(opt_state)
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(opt_state))
    return {
        "params": [np.asarray(a) for a in jax.tree.leaves(jadam.to_host(params))],
        "losses": np.asarray([float(jadam.to_host(v)) for v in losses]),
        "state_bytes": np.asarray([per_device[d] for d in sorted(per_device, key=lambda d: d.id)]),
        "state_total": np.asarray(total),
        # The moments gathered to the host (a collective when they are split across
        # processes), concatenated: compared with one device's.
        "moments": np.concatenate(
            [np.ravel(a) for a in jax.tree.leaves(jadam.to_host(opt_state)) if np.ndim(a)]
        ),
    }


def quantized_zero1(mesh, steps: int = 5) -> dict:
    """8-bit moments (`jadam.Quantized`) with replicated vs ZeRO-1 state, on `mesh`.

    Returns the largest parameter difference between the two, and the state's
    bytes per device and in total for each (the moments are `QuantizedMoment`
    pytrees: uint8 codes in the parameter's shape plus per-block float32 scales).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jadam

    tx = jadam.adam(1e-2, mu_dtype="q8", nu_dtype=jadam.Quantized(block_size=64, min_size=0))
    params = {
        "w": jnp.linspace(-1.0, 1.0, 256 * 64).reshape(256, 64),  # 16384 entries: quantized
        "b": jnp.zeros(64),  # mu stays float32 (min_size), nu: 1 block of 64
        "odd": jnp.ones((3, 5)),  # nothing divides by 8: replicated either way
    }
    x = np.random.RandomState(0).normal(size=(64, 256)).astype(np.float32)
    rep = jadam.replicated(mesh)
    out = {}
    for name, zero1_axis in (("replicated", None), ("zero1", "data")):
        state_sh = (rep, jadam.state_shardings(tx, params, rep, zero1_axis=zero1_axis))

        def step(state, xb):
            p, s = state
            loss_fn = lambda p: jnp.mean((xb @ p["w"] + p["b"]) ** 2) + jnp.sum(p["odd"] ** 2)
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        step = jadam.jit_data_parallel(step, mesh, state_sh)
        state = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_sh)(params)
        batch = jadam.shard_batch(x, mesh)
        for _ in range(steps):
            state, _ = step(state, batch)
        out[name] = (
            jadam.to_host(state[0]),
            sorted(set(jadam.bytes_per_device(state[1]).values())),
            sum(leaf.nbytes for leaf in jax.tree.leaves(state[1])),
        )
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(out["replicated"][0]), jax.tree.leaves(out["zero1"][0]), strict=True
        )
    )
    return {
        "max_param_diff": diff,
        **{f"{k}_bytes_per_device": v[1] for k, v in out.items()},
        **{f"{k}_bytes_total": v[2] for k, v in out.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="d1,d8,d8z")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args(argv)

    import jadam  # before jax touches a device: init_distributed must come first

    distributed = args.coordinator is not None
    if distributed:
        jadam.init_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            init_timeout=60,
            heartbeat_timeout_seconds=20,
            shutdown_timeout_seconds=20,
        )
    import jax

    out = {}
    for tag in args.runs.split(","):
        scan, count, model, zero1 = re.fullmatch(r"(s?)(?:d(\d+)|all)(m?)(z?)", tag).groups()
        devices = jax.devices() if count is None else jax.devices()[: int(count)]
        if model:
            mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1, 2), ("data", "model"))
        else:
            mesh = jadam.data_parallel_mesh(devices)
        result = train(mesh, zero1=bool(zero1), local=distributed, scan=bool(scan))
        for key, value in result.items():
            if key == "params":
                for i, leaf in enumerate(value):
                    out[f"{tag}/params/{i}"] = leaf
            else:
                out[f"{tag}/{key}"] = value
    np.savez(args.out, **out)
    print(f"process {jax.process_index()}/{jax.process_count()}: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
