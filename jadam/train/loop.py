"""The compiled programs: a training chunk, an evaluation chunk, a prediction chunk.

A chunk is ``steps`` batches run as ONE jitted ``lax.scan``. The data arrays live on
the device for the whole ``fit``; each call receives only a small ``(steps, batch)``
array of row indices (a NumPy permutation made on the host: ~free, whereas
``jax.random.permutation`` of 100k indices costs ~60 ms on a 2-core CPU).

The last partial batch: in training it runs as one extra step at its own static size
inside the same program (``train_plan``), so no compute is wasted on padding and the
shapes are the same every epoch (one compilation per ``fit`` shape). Evaluation and
prediction pad it to a full batch with weight 0 (``batch_plan``); the weighted sums
count every real example exactly once (no data dropped).

The train state is donated: XLA updates parameters and optimizer state in place
instead of page-faulting fresh buffers every call. All loss and metric sums come back
as ONE flat float32 vector per call: the only device-to-host transfer.

On a mesh (``Programs(..., mesh=mesh)``) the same functions are jitted with shardings
(data parallel, on JAX's own SPMD): the data arrays and parameters are replicated,
the ``(steps, batch)`` index arrays are split along the batch over the mesh's
``"data"`` axis, so each device gathers and differentiates only its rows, and XLA
all-reduces the gradients. With ``zero1=True`` each moment of the optimizer state is
also split over the data axis (ZeRO-1: each device stores 1/N of it). The metric
vector comes back replicated. A one-device mesh runs the same program as N devices.

Model state (batch statistics, NNX RNG counts) lives in the train state and is
updated by each training step. On a mesh it is replicated, and a batch norm's
statistics are those of the *global* batch: the batch axis is one array split over
devices, so XLA computes its mean and variance with a cross-device reduction, and N
devices give the numbers of one device with the whole batch (up to float32
summation order), unlike Keras/PyTorch's per-replica statistics. (With Adam, the
bias of a layer feeding a batch norm, whose gradient is 0 up to that rounding, can
still move differently: Adam scales rounding noise to a full step.) Dropout keys are
``fold_in(rng, step)``: the same masks for the global batch whatever the mesh.

Sample weights (``w``): the loss of a batch is ``sum(w * loss) / batch_size``, and
the loss reported is ``sum(w * loss) / n`` over the epoch (Keras' default
``"sum_over_batch_size"`` reduction); metrics are weighted means
``sum(w * m) / sum(w)``. Without weights (``None``) the program is the unweighted one.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jadam._sharding import batch_sharding, replicated, shard_batch, state_shardings
from jadam.train.losses import Loss, Metric, weight_penalty
from jadam.train.models import ModelAdapter


class TrainState(NamedTuple):
    params: Any  # the model's trainable parameters (a pytree)
    opt_state: Any  # the optimizer's state (a pytree; jadam never looks inside)
    step: jax.Array  # shape=(), dtype=int32: optimizer steps taken
    rng: jax.Array  # shape=(2,), dtype=uint32: raw key data, saved with checkpoints
    # the model's other variables (batch statistics, NNX RNG state); {} for most models
    model_state: Any = {}  # noqa: RUF012 (a NamedTuple default; never mutated)


def batch_plan(
    n: int, batch_size: int, perm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(steps, batch)`` and weights: the last batch padded with weight 0."""
    steps = -(-n // batch_size)
    idx = np.zeros(steps * batch_size, np.int32)
    idx[:n] = np.arange(n, dtype=np.int32) if perm is None else perm
    w = np.zeros(steps * batch_size, np.float32)
    w[:n] = 1.0
    return idx.reshape(steps, batch_size), w.reshape(steps, batch_size)


def train_plan(
    n: int, batch_size: int, perm: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full batches ``(steps, batch)`` of row indices, and the last partial batch (or None)."""
    order = np.arange(n, dtype=np.int32) if perm is None else perm.astype(np.int32)
    full = n // batch_size
    idx = order[: full * batch_size].reshape(full, batch_size)
    rem = order[full * batch_size :] if n % batch_size else None
    return idx, rem


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (the same value on every process) as a global array with ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding, may_alias=False)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # A typed PRNG key (e.g. in an NNX model's Rngs): place its raw data, rewrap it.
        data = place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)  # each process builds only its own devices' shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _take(x: Any, rows: jax.Array) -> Any:
    # mode="clip": indices are in range by construction; no out-of-bounds fill select.
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=0, mode="clip"), x)


class Programs:
    """The jitted functions for one (model, optimizer, loss, metrics) combination.

    ``trace_counts`` counts how many times each function was traced: a test uses it
    to check that a second ``fit`` or ``evaluate`` compiles nothing new.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        tx: optax.GradientTransformation,
        loss: Loss,
        metrics: list[Metric],
        l1: float = 0.0,
        l2: float = 0.0,
        *,
        mesh: Mesh | None = None,
        zero1: bool = False,
    ):
        self.adapter, self.tx, self.loss, self.metrics = adapter, tx, loss, metrics
        self.l1, self.l2 = float(l1), float(l2)
        self.mesh, self.zero1 = mesh, bool(zero1)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._layout = None
        self.state_sharding: Any = None  # set by `bind` on a mesh
        if mesh is None:
            self.train_chunk = jax.jit(self._train_chunk, donate_argnums=(0,))
            self.eval_chunk = jax.jit(self._eval_chunk)
            self.predict_chunk = jax.jit(self._predict_chunk)
            self.init_state = jax.jit(self._init_state)
        else:
            if "data" not in mesh.shape:
                raise ValueError(
                    "the mesh needs a 'data' axis to split batches over, got axes "
                    f"{mesh.axis_names} (jadam.data_parallel_mesh() makes one)"
                )
            # The state's shardings depend on the parameters' shapes: `bind` jits then.
            self.train_chunk = self.eval_chunk = self.predict_chunk = self.init_state = None

    @property
    def n_shards(self) -> int:
        """How many ways a batch is split: the size of the mesh's data axis (1 off a mesh)."""
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    def bind(self, params: Any) -> None:
        """On a mesh: jit the programs with the shardings of a state for ``params``."""
        if self.mesh is None or self.state_sharding is not None:
            return
        rep = replicated(self.mesh)
        idx = batch_sharding(self.mesh, "data", batch_dim=1)  # (steps, batch) indices
        opt = state_shardings(self.tx, params, rep, zero1_axis="data" if self.zero1 else None)
        self.state_sharding = state_sh = TrainState(rep, opt, rep, rep, rep)
        # The last partial batch (``rem``) is placed by `place_rem` (split when its size
        # allows, else replicated); None lets jit take that placement as it is.
        self.train_chunk = jax.jit(
            self._train_chunk, donate_argnums=(0,),
            in_shardings=(state_sh, rep, rep, idx, None, idx, None),
            out_shardings=(state_sh, rep),
        )  # fmt: skip
        self.eval_chunk = jax.jit(
            self._eval_chunk, in_shardings=(rep, rep, rep, rep, idx, idx, idx), out_shardings=rep
        )
        self.predict_chunk = jax.jit(
            self._predict_chunk, in_shardings=(rep, rep, rep, idx), out_shardings=rep
        )
        self.init_state = jax.jit(
            self._init_state, in_shardings=(rep, rep, rep), out_shardings=state_sh
        )

    # ---- placing host data (every process passes the same global values)

    def replicate(self, tree: Any) -> Any:
        """Host arrays to the device(s): one device off a mesh, every device on one."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.tree.map(lambda a: place(a, replicated(self.mesh)), tree)

    def place_indices(self, tree: Any) -> Any:
        """``(steps, batch)`` index/weight arrays: split along the batch on a mesh."""
        if self.mesh is None:
            return tree  # NumPy: jit transfers it with the call
        return shard_batch(tree, self.mesh, "data", batch_dim=1)

    def place_rem(self, rem: np.ndarray | None) -> Any:
        """The last partial batch's indices: split over the data axis when its size
        allows, else replicated (each device then runs that one small step whole)."""
        if self.mesh is None or rem is None:
            return rem
        if len(rem) % self.n_shards == 0:
            return shard_batch(rem, self.mesh, "data")
        return place(rem, replicated(self.mesh))

    def place_state(self, state: TrainState) -> TrainState:
        """A host train state (e.g. a restored checkpoint) onto the device(s)."""
        if self.mesh is None:
            return jax.device_put(state)
        self.bind(state.params)
        # The shardings are a prefix of the state (one for all parameters, ...).
        return jax.tree.map(
            lambda sh, sub: jax.tree.map(lambda a: place(a, sh), sub), self.state_sharding, state
        )

    # names of the numbers reported, in order ("loss" first)
    @property
    def names(self) -> list[str]:
        return ["loss"] + [m.name for m in self.metrics]

    def _init_state(self, params: Any, model_state: Any, rng: jax.Array) -> TrainState:
        return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32), rng, model_state)

    def _zero_sums(self) -> list[Any]:
        return [(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))] + [
            m.init() for m in self.metrics
        ]

    def _add(self, sums, out, y, w, per, penalty, count):
        """Add a batch: metrics weighted by ``w``; the loss as ``sum(w * per)`` plus the
        penalty once per row, over ``count`` rows (Keras' sum-over-batch-size)."""
        loss_sums = (sums[0][0] + jnp.sum(w * per) + penalty * count, sums[0][1] + count)
        return [loss_sums] + [
            m.update(s, out, y, w) for m, s in zip(self.metrics, sums[1:], strict=True)
        ]

    @staticmethod
    def _flat(sums) -> jax.Array:
        return jnp.concatenate(
            [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(sums)]
        )

    def unflatten(self, flat: np.ndarray) -> list[Any]:
        """Host side: the flat vector back into per-metric sums (NumPy)."""
        if self._layout is None:  # computed once: eval_shape costs ~0.1 ms per call
            leaves, treedef = jax.tree.flatten(jax.eval_shape(self._zero_sums))
            spans, i = [], 0
            for leaf in leaves:
                size = int(np.prod(leaf.shape))
                spans.append((i, i + size, leaf.shape))
                i += size
            self._layout = (spans, treedef)
        spans, treedef = self._layout
        return jax.tree.unflatten(treedef, [flat[a:b].reshape(shape) for a, b, shape in spans])

    def results(self, sums: list[Any]) -> dict[str, float]:
        logs = {"loss": float(sums[0][0]) / max(float(sums[0][1]), 1e-12)}
        for m, s in zip(self.metrics, sums[1:], strict=True):
            logs[m.name] = m.result(s)
        return logs

    def _train_chunk(self, state: TrainState, x, y, idx, rem, w=None, wrem=None):
        """``idx``: (steps, batch) full batches, scanned; ``rem``: the epoch's last partial
        batch (its own static size) or None. Every row counts exactly once. ``w``/``wrem``:
        the sample weights of those rows, or None (unweighted)."""
        self.trace_counts["train"] += 1  # Python side effect: runs only while tracing
        adapter = self.adapter

        def loss_fn(params, model_state, xb, yb, wb, key):
            out, model_state = adapter.apply_train(params, model_state, xb, key)
            per = self.loss.fn(out, yb).astype(jnp.float32)
            penalty = weight_penalty(params, self.l1, self.l2)
            data = jnp.mean(per) if wb is None else jnp.sum(wb * per) / per.shape[0]
            return data + penalty, (out, per, penalty, model_state)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(carry, batch):
            state, sums = carry
            rows, wb = batch
            xb, yb = _take(x, rows), _take(y, rows)
            key = None
            if adapter.needs_rng:  # a fresh dropout key per step, reproducible on resume
                key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            (_, (out, per, penalty, model_state)), grads = grad_fn(
                state.params, state.model_state, xb, yb, wb, key
            )
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            mw = jnp.ones(rows.shape, jnp.float32) if wb is None else wb
            sums = self._add(sums, out, yb, mw, per, penalty, rows.shape[0])
            new = TrainState(params, opt_state, state.step + 1, state.rng, model_state)
            return (new, sums), None

        carry = (state, self._zero_sums())
        if idx.shape[0]:
            carry, _ = jax.lax.scan(step, carry, (idx, w))
        if rem is not None:
            # The last partial batch runs at its own (static) size, inside the same program:
            # no padding compute in training, no recompilation across epochs.
            carry, _ = step(carry, (rem, wrem))
        state, sums = carry
        return state, self._flat(sums)

    def _eval_chunk(self, params, rest, x, y, idx, w, sw=None):
        """``w``: 1 for real rows, 0 for padding; ``sw``: sample weights or None."""
        self.trace_counts["eval"] += 1
        penalty = weight_penalty(params, self.l1, self.l2)

        def body(sums, batch):
            rows, wb, swb = batch
            xb, yb = _take(x, rows), _take(y, rows)
            out = self.adapter.apply(params, rest, xb)
            per = self.loss.fn(out, yb).astype(jnp.float32)
            mw = wb if swb is None else wb * swb
            return self._add(sums, out, yb, mw, per, penalty, jnp.sum(wb)), None

        sums, _ = jax.lax.scan(body, self._zero_sums(), (idx, w, sw))
        return self._flat(sums)

    def _predict_chunk(self, params, rest, x, idx):
        self.trace_counts["predict"] += 1

        def body(_, rows):
            return None, self.loss.link(self.adapter.apply(params, rest, _take(x, rows)))

        _, out = jax.lax.scan(body, None, idx)
        return out.reshape(-1, *out.shape[2:])
