"""Scale-out on JAX's own SPMD: meshes, state shardings, data-parallel steps.

Nothing here is a protocol of its own. A data-parallel step is one `jax.jit`
with `in_shardings`/`out_shardings` over a `jax.sharding.Mesh`: the batch is
sharded over the mesh's data axis, parameters are replicated (or sharded by the
user's rules), and XLA's SPMD partitioner inserts the gradient all-reduce.
Several processes (hosts) join through `jax.distributed.initialize`, after which
`jax.devices()` lists every device of every process and the same code runs.

ZeRO-1 (Rajbhandari et al., arXiv:1910.02054, stage 1) is only a different
sharding of the optimizer state: each moment leaf is split over the data axis,
so each device stores 1/N of it and updates only its slice; XLA all-gathers the
updates into the replicated parameters. (On CPU the compiled step shows one
gradient all-reduce plus the all-gathers; whether a backend turns the
all-reduce into a reduce-scatter is XLA's choice.) The arithmetic is the same
as without it: parameters come out bit-identical.

Usage (the same code on 1 device, N devices, or N processes)::

    mesh = jadam.data_parallel_mesh()                     # every device, axis "data"
    rep = jadam.replicated(mesh)
    state_sh = (rep, jadam.state_shardings(tx, params, rep, zero1_axis="data"))
    step = jadam.jit_data_parallel(step_fn, mesh, state_sh)  # step_fn(state, batch)
    state = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_sh)(params)
    for x, y in batches:
        state, loss = step(state, jadam.shard_batch((x, y), mesh))

The functions here work the same in one process and in several: batches and
replicated trees are built with `jax.make_array_from_callback` /
`jax.make_array_from_process_local_data`, which accept shardings that span
devices of other processes.
"""

from __future__ import annotations

import errno
import math
import re
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# --------------------------------------------------------------------------- meshes


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh over `devices` (default: every device of every process).

    >>> import jadam
    >>> jadam.data_parallel_mesh().axis_names
    ('data',)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must not be empty.")
    return Mesh(np.asarray(devices, dtype=object), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: str = "data", *, batch_dim: int = 0) -> NamedSharding:
    """The sharding that splits dimension `batch_dim` (the batch) over `axis`.

    `batch_dim=1` fits arrays laid out `(steps, batch, ...)`, such as the
    per-step row indices of a `lax.scan` over batches.
    """
    _check_axis(mesh, axis, "axis")
    if batch_dim < 0:
        raise ValueError(f"batch_dim must be >= 0, got {batch_dim}.")
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_dim), axis))


def _check_axis(mesh: Mesh, axis: str, name: str) -> None:
    if axis not in mesh.shape:
        raise ValueError(f"{name}={axis!r} is not an axis of the mesh {dict(mesh.shape)}.")


# --------------------------------------------------------------------------- placing data


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the same global value on every process) as an array with `sharding`."""
    if jax.process_count() == 1:
        # Never alias `x`: a step that donates its state must not delete the caller's arrays.
        return jax.device_put(x, sharding, may_alias=False)
    # Several processes: each builds only its own shards from its (identical) copy.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of `tree` copied to every device of `mesh`.

    With several processes, each process must pass the same values (e.g. the
    same initial parameters from the same seed). The result never aliases
    `tree`'s buffers, so a step that donates it leaves `tree` intact.
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data", *, batch_dim: int = 0) -> Any:
    """Split dimension `batch_dim` of every leaf of the *global* `batch` over `axis`.

    Every process passes the whole batch (the same values); each keeps only the
    rows of its own devices. When each process holds only its own rows, use
    `shard_local_batch` instead.

    Raises:
      ValueError: a leaf's batch size is not a multiple of the axis size.
    """
    sharding = batch_sharding(mesh, axis, batch_dim=batch_dim)
    size = mesh.shape[axis]

    def put(x):
        shape = np.shape(x)
        if len(shape) <= batch_dim or shape[batch_dim] % size:
            raise ValueError(
                f"shard_batch: a leaf of shape {shape} cannot be split over the {size} "
                f"devices of mesh axis {axis!r}; make the batch size a multiple of {size}."
            )
        return _put(x, sharding)

    return jax.tree.map(put, batch)


def shard_local_batch(
    local_batch: Any, mesh: Mesh, axis: str = "data", *, batch_dim: int = 0
) -> Any:
    """Assemble a global batch from each process's own rows.

    Each process passes its part (size along `batch_dim` = global batch /
    process count, in process order); the result is one global array sharded
    over `axis`. In a single process this is `shard_batch`.
    """
    sharding = batch_sharding(mesh, axis, batch_dim=batch_dim)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(tree: Any) -> Any:
    """Every leaf as a NumPy array holding the full global value, on every process.

    Replicated arrays are read from a local copy; sharded ones are gathered
    (a collective: every process must call this).
    """

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes each local device stores for `tree`, measured from its shards."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# --------------------------------------------------------------------------- state shardings


@jax.tree_util.register_pytree_node_class
class _Params:
    """Stands for the whole params tree while `tx.init` builds the state's layout.

    A pytree node with no children: every `jax.tree.map(f, params)` inside an
    `init` returns it untouched, so it marks exactly where a params-shaped
    subtree (a moment, whatever its storage) sits in the state (the trick of
    `optax.tree_map_params`).
    """

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux, children
        return cls()


def _is_params(x: Any) -> bool:
    return isinstance(x, _Params)


def _spec_axes(spec: PartitionSpec) -> list[str]:
    """Mesh axes named in `spec`, in order."""
    axes: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return axes


def _with_zero1(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, axis: str):
    """`spec` with `axis` added on the largest dimension it divides; else `spec`."""
    n = mesh.shape[axis]
    if n == 1 or axis in _spec_axes(spec) or not shape:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    best, best_local = None, 0
    for d, size in enumerate(shape):
        entry = entries[d]
        existing = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        split = math.prod(mesh.shape[a] for a in existing)
        local = size // split
        if size % (split * n) == 0 and local > best_local:
            best, best_local = d, local
    if best is None:
        return spec
    entry = entries[best]
    existing = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    entries[best] = (*existing, axis) if existing else axis
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _moment_leaf_spec(leaf, param, param_spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """The spec of one stored-moment leaf of a parameter.

    A leaf of the parameter's shape takes its spec. Any other leaf (e.g. the
    flat codes or per-block scales of a quantized moment) is split along its
    leading axis over the parameter's mesh axes when they divide it (a flat
    row-major array split in order holds the same elements as the parameter
    split along its first axis), and replicated otherwise.
    """
    if tuple(leaf.shape) == tuple(param.shape):
        return param_spec
    axes = _spec_axes(param_spec)
    if axes and leaf.shape and leaf.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0:
        return PartitionSpec(tuple(axes) if len(axes) > 1 else axes[0])
    return PartitionSpec()


def _param_sharding_leaves(params: Any, param_shardings: Any, mesh: Mesh | None):
    """One NamedSharding per params leaf, and the mesh to use for the rest."""
    treedef = jax.tree.structure(params)
    n_leaves = treedef.num_leaves
    is_spec = lambda x: isinstance(x, (NamedSharding, PartitionSpec)) or x is None
    if is_spec(param_shardings):
        flat = [param_shardings] * n_leaves
    else:
        try:
            # A prefix of the params tree: broadcast each entry over its subtree.
            flat = treedef.flatten_up_to(
                jax.tree.map(
                    lambda s, sub: jax.tree.map(lambda _: s, sub),
                    param_shardings,
                    params,
                    is_leaf=is_spec,
                )
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                "param_shardings must be a NamedSharding, a PartitionSpec, None, or a "
                f"tree matching (a prefix of) params: {e}"
            ) from None
    if mesh is None:
        mesh = next((s.mesh for s in flat if isinstance(s, NamedSharding)), None)
        if mesh is None:
            raise ValueError("mesh is required when param_shardings holds no NamedSharding.")
    out = []
    for s in flat:
        if s is None:
            s = NamedSharding(mesh, PartitionSpec())
        elif isinstance(s, PartitionSpec):
            s = NamedSharding(mesh, s)
        elif not isinstance(s, NamedSharding):
            raise TypeError(f"param_shardings leaves must be NamedSharding, got {type(s)}.")
        out.append(s)
    return out, mesh


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    mesh: Mesh | None = None,
    *,
    zero1_axis: str | None = None,
) -> Any:
    """The `NamedSharding` of every leaf of `tx.init(params)`.

    - Each moment (any params-shaped subtree of the state: `mu`, `nu`,
      `nu_max`, `optax.MultiSteps`' accumulated gradients, ...) follows its
      parameter's sharding. A stored moment that is itself a small pytree
      (quantized codes and scales) is placed leaf by leaf: leaves of the
      parameter's shape take its sharding, others are split along their leading
      axis over the same mesh axes when these divide it, else replicated.
    - Every other leaf (step counts, injected hyperparameters) is replicated.
    - With `zero1_axis`, each moment leaf is *also* split over that mesh axis,
      along its largest dimension the axis size divides (ZeRO-1: each device
      stores 1/N of the optimizer state). A leaf no dimension of which is
      divisible keeps its parameter's sharding; so does a leaf already split over
      that axis.

    Nothing is computed: the state's layout comes from `jax.eval_shape`.

    Args:
      tx: the optimizer (anything with `init`).
      params: the parameters, as arrays or `jax.ShapeDtypeStruct`s.
      param_shardings: a `NamedSharding` or `PartitionSpec` for all parameters,
        or a tree of them matching (a prefix of) `params`; `None` replicates.
      mesh: the mesh for `PartitionSpec`s and replicated leaves; defaults to the
        mesh of the first `NamedSharding` in `param_shardings`.
      zero1_axis: the data-parallel mesh axis to shard the moments over, or None.

    Returns:
      A tree of `NamedSharding` with the structure of `tx.init(params)`: pass it
      as `jax.jit(..., out_shardings=...)` or to `jax.device_put`.

    Example:
      >>> import jax, jax.numpy as jnp, jadam
      >>> mesh = jax.sharding.AbstractMesh((8,), ("data",))  # or a real Mesh
      >>> tx = jadam.adam(1e-3)
      >>> params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(3)}
      >>> sh = jadam.state_shardings(tx, params, mesh=mesh, zero1_axis="data")
      >>> sh[0].mu["w"].spec, sh[0].mu["b"].spec, sh[0].count.spec
      (P('data',), P(), P())
    """
    flat_shardings, mesh = _param_sharding_leaves(params, param_shardings, mesh)
    if zero1_axis is not None:
        _check_axis(mesh, zero1_axis, "zero1_axis")
    param_structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), p.dtype), params)
    treedef = jax.tree.structure(param_structs)
    param_leaves = treedef.flatten_up_to(param_structs)
    state = jax.eval_shape(tx.init, param_structs)
    rep = replicated(mesh)

    def moment_sharding(leaf, param, sharding: NamedSharding) -> NamedSharding:
        spec = _moment_leaf_spec(leaf, param, sharding.spec, sharding.mesh)
        if zero1_axis is not None and zero1_axis in sharding.mesh.shape:
            spec = _with_zero1(tuple(leaf.shape), spec, sharding.mesh, zero1_axis)
        return NamedSharding(sharding.mesh, spec)

    # Fallback for a moment tree that does not mirror params, or a transform
    # whose init cannot run on the marker: match leaves to parameters by shape.
    by_shape: dict[tuple[int, ...], Any] = {}
    for p, s in zip(param_leaves, flat_shardings, strict=True):
        key = tuple(p.shape)
        by_shape[key] = s if by_shape.get(key, s) == s else None  # None: ambiguous

    def by_shape_sharding(leaf) -> NamedSharding:
        if not leaf.shape:
            return rep
        s = by_shape.get(tuple(leaf.shape))
        s = s if s is not None else rep
        if zero1_axis is None:
            return s
        return NamedSharding(s.mesh, _with_zero1(tuple(leaf.shape), s.spec, s.mesh, zero1_axis))

    def params_tree(subtree):
        try:
            per_param = treedef.flatten_up_to(subtree)
        except (ValueError, TypeError):
            return jax.tree.map(by_shape_sharding, subtree)
        out = [
            jax.tree.map(lambda leaf, p=p, s=s: moment_sharding(leaf, p, s), sub)
            for sub, p, s in zip(per_param, param_leaves, flat_shardings, strict=True)
        ]
        return treedef.unflatten(out)

    try:
        marked = jax.eval_shape(tx.init, _Params())
        outline = jax.tree.structure(marked, is_leaf=_is_params)
        subtrees = outline.flatten_up_to(state)
    except Exception:  # an init that cannot run on the marker: match leaves by shape
        return jax.tree.map(by_shape_sharding, state)
    marks = outline.flatten_up_to(marked)
    return outline.unflatten(
        [params_tree(sub) if _is_params(m) else rep for m, sub in zip(marks, subtrees, strict=True)]
    )


# --------------------------------------------------------------------------- steps


def jit_data_parallel(
    step: Callable[..., Any],
    mesh: Mesh,
    state_sharding: Any,
    *,
    axis: str = "data",
    batch_dim: int = 0,
    donate_state: bool = True,
) -> Callable[..., Any]:
    """`jax.jit(step)` for `step(state, batch) -> (state, aux)`, data parallel.

    `state` has `state_sharding` in and out (a tree of shardings or one for
    all), every leaf of `batch` is split along `batch_dim` over `axis`,
    and `aux` (metrics) comes back replicated. The gradient all-reduce (and,
    with ZeRO-1 state, the all-gather of the updates) is inserted by XLA.
    The same function runs on one device (a one-device mesh) and on many.
    """
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding(mesh, axis, batch_dim=batch_dim)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,) if donate_state else (),
    )


# --------------------------------------------------------------------------- processes


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")

# The handshake on the coordinator's port that precedes `jax.distributed.initialize`
# (see `init_distributed`): one line each way, then the socket is closed.
_HELLO = "jadam-init 1"  # + " <process_id> <num_processes>\n"; 1: version of these lines
_JAX_START_S = 30  # JAX's wait after the handshake: at least this, time to start its service
_POLL_S = 0.2  # how often a process retries a coordinator that is not listening yet


class PeerMismatchError(ValueError):
    """The processes of a run disagree (number of processes, a process id taken twice)."""


def _check_address(value: Any, name: str) -> tuple[str, int]:
    address = value if isinstance(value, str) else ""
    match = _ADDRESS.match(address)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(
            f"{name} must be 'host:port' (e.g. '10.0.0.1:1234') with a port in 1..65535, "
            f"got {value!r}."
        )
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _ids(ids) -> str:
    ids = sorted(ids)
    return f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _listen(host: str, port: int, address: str) -> socket.socket:
    """A socket listening on (host, port), or an OSError saying why it cannot."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"init_distributed: cannot resolve the coordinator {address}: {e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As gRPC does: connections of an earlier run in TIME_WAIT do not make the port busy.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                f"init_distributed: the coordinator address {address} is already in use on "
                f"this machine (another program or run listens on port {port}); choose a free "
                "port for coordinator_address."
            ) from None
        raise OSError(
            f"init_distributed: process 0 cannot listen on {address} ({e.strerror}); run it "
            "on the machine that coordinator_address names, or pass coordinator_bind_address."
        ) from None
    return sock


def _gather(listener: socket.socket, n: int, deadline: float, address: str, wait: float) -> None:
    """Process 0: wait until processes 1..n-1 have said hello, then tell them all to go."""
    joined: dict[int, socket.socket] = {}
    pending: dict[socket.socket, bytes] = {}  # connected, hello not read yet
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)

    def drop(conn: socket.socket) -> None:
        sel.unregister(conn)
        pending.pop(conn, None)
        for pid, c in list(joined.items()):
            if c is conn:
                del joined[pid]
        conn.close()

    def reply(conn: socket.socket, line: str) -> None:
        try:
            conn.sendall(line.encode() + b"\n")
        except OSError:
            pass

    try:
        while len(joined) < n - 1:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                missing = set(range(1, n)) - set(joined)
                for conn in joined.values():
                    reply(conn, f"missing {','.join(map(str, sorted(missing)))}")
                raise TimeoutError(
                    f"init_distributed: after {wait:g} s, {_ids(missing)} of {n} had not joined "
                    f"the coordinator at {address}; start every process with the same "
                    "coordinator_address and num_processes, or wait longer with init_timeout."
                )
            for key, _ in sel.select(timeout):
                sock = key.fileobj
                if sock is listener:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(256)
                except OSError:
                    data = b""
                if not data:  # gone (a process that gave up, or a port scanner)
                    drop(sock)
                    continue
                if sock not in pending:
                    continue  # nothing more is expected from a joined process
                pending[sock] += data
                if b"\n" not in pending[sock]:
                    if len(pending[sock]) > 128:
                        drop(sock)
                    continue
                words = pending.pop(sock).split(b"\n")[0].decode("ascii", "replace").split()
                if (
                    len(words) != 4
                    or " ".join(words[:2]) != _HELLO
                    or not (words[2].isdigit() and words[3].isdigit())
                ):
                    drop(sock)  # not a jadam process
                    continue
                pid, count = int(words[2]), int(words[3])
                if count != n:
                    reply(sock, f"refused process 0 was started with num_processes={n}, "
                                f"process {pid} with {count}")  # fmt: skip
                    drop(sock)
                elif pid in joined or not 0 < pid < n:
                    reply(sock, f"refused process id {pid} is already taken or outside 1..{n - 1}")
                    drop(sock)
                else:
                    joined[pid] = sock
        for conn in joined.values():
            reply(conn, "go")
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def _join(host: str, port: int, pid: int, n: int, deadline: float, address: str, wait: float):
    """Process `pid` > 0: say hello to the coordinator; return once it says go."""
    reached = False
    while True:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            if reached:
                raise TimeoutError(
                    f"init_distributed: process {pid} reached the coordinator at {address}, but "
                    f"not every one of the {n} processes had joined after {wait:g} s (process 0 "
                    "names the missing ones); wait longer with init_timeout."
                )
            raise TimeoutError(
                f"init_distributed: after {wait:g} s, no coordinator (process 0) answered at "
                f"{address}; start process 0 there, check the address and that it can be "
                "reached from this machine, or wait longer with init_timeout."
            )
        try:
            conn = socket.create_connection((host, port), timeout=min(timeout, 5.0))
        except OSError:  # not listening yet (or unreachable): retry until the deadline
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            continue
        with conn:
            try:
                conn.sendall(f"{_HELLO} {pid} {n}\n".encode())
                reached = True
                line = b""
                while b"\n" not in line:
                    conn.settimeout(max(0.01, deadline - time.monotonic()))
                    data = conn.recv(256)
                    if not data:
                        break
                    line += data
            except OSError:  # reset or timed out: try again while there is time
                continue
        words = line.split(b"\n")[0].decode("ascii", "replace").split(" ", 1)
        if words[0] == "go":
            return
        if words[0] == "missing":
            missing = [int(w) for w in words[1].split(",")]
            raise TimeoutError(
                f"init_distributed: the coordinator at {address} stopped waiting: {_ids(missing)} "
                f"of {n} had not joined; start every process with the same coordinator_address "
                "and num_processes, or wait longer with init_timeout."
            )
        if words[0] == "refused":
            raise PeerMismatchError(
                f"init_distributed: the coordinator at {address} refused: {words[1]}."
            )
        time.sleep(_POLL_S)  # closed without an answer: something else on the port; retry


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    init_timeout: float = 60.0,
    local_device_ids: Sequence[int] | None = None,
    coordinator_bind_address: str | None = None,
    heartbeat_timeout_seconds: int = 100,
    shutdown_timeout_seconds: int = 300,
) -> None:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`).

    Call it first, before anything touches a device. Give all three of
    `coordinator_address` ("host:port" of process 0, the same on every
    process), `num_processes` and `process_id` (0 .. num_processes - 1, one per
    process), or none of them on a Cloud TPU pod, Slurm or Open MPI, where JAX
    detects them. `num_processes=1` returns without starting anything.

    With the three given, the processes first meet on the coordinator's port
    (one line each way over TCP) and only then start JAX's coordination service,
    so that each failure is a Python exception: JAX itself, when a peer never
    comes, aborts the process after its timeout, and segfaults when the port is
    taken. Process 0 listens on `coordinator_bind_address` (default:
    `coordinator_address` itself, not every interface; give e.g. "0.0.0.0:1234"
    where the coordinator's address is not one of its own interfaces, as behind
    NAT).

    Afterwards `jax.devices()` lists the devices of every process, and
    `data_parallel_mesh()` spans them all. On CPU, the processes exchange data
    through gloo (`jax_cpu_collectives_implementation`, the default since JAX
    0.5); on GPU through NCCL, on TPU through ICI/DCN, chosen by JAX.

    A process that dies later is JAX's to detect: the others get an error
    (`jax.errors.JaxRuntimeError`) from their next collective, or are
    terminated by JAX once it misses `heartbeat_timeout_seconds` of heartbeats
    (at once if process 0, which hosts the coordination service, is the one lost).

    Args:
      coordinator_address: "host:port" of process 0.
      num_processes: how many processes take part.
      process_id: this process's rank.
      init_timeout: seconds to wait for every process (for auto-detected runs:
        JAX's own `initialization_timeout`, rounded up).
      local_device_ids: restricts this process to these local devices.
      coordinator_bind_address: "host:port" process 0 listens on.
      heartbeat_timeout_seconds, shutdown_timeout_seconds: passed to JAX.

    Raises:
      ValueError: only some of the three arguments are given, `num_processes`
        is not a positive int, `process_id` is outside [0, num_processes), an
        address is not "host:port" with a port in 1..65535, or `init_timeout` is
        not a positive finite number. (`PeerMismatchError`, a subclass: the
        processes disagree on `num_processes`, or two claim one `process_id`.)
      TimeoutError: not every process joined within `init_timeout`; the message
        names the coordinator and, as far as this process knows, who is missing.
      OSError: process 0 cannot listen on the coordinator's address (the port
        is in use, or the address is not one of this machine's).
      RuntimeError: JAX already initialized its devices, or this was called twice.
    """
    if (
        isinstance(init_timeout, bool)
        or not isinstance(init_timeout, (int, float, np.integer, np.floating))
        or not 0 < init_timeout < math.inf
    ):
        raise ValueError(
            f"init_timeout must be a positive number of seconds, got {init_timeout!r}."
        )
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "init_distributed: give all of coordinator_address, num_processes and "
            "process_id, or none of them (automatic detection on TPU pods, Slurm, "
            f"Open MPI); got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}."
        )
    if not all(given):
        if jax.distributed.is_initialized():
            raise RuntimeError("init_distributed: jax.distributed is already initialized.")
        jax.distributed.initialize(
            local_device_ids=local_device_ids,
            initialization_timeout=max(1, math.ceil(init_timeout)),
            coordinator_bind_address=coordinator_bind_address,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            shutdown_timeout_seconds=shutdown_timeout_seconds,
        )
        return
    if not _is_int(num_processes) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}.")
    if not _is_int(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be an int in [0, num_processes={num_processes}), got {process_id!r}."
        )
    host, port = _check_address(coordinator_address, "coordinator_address")
    bind = coordinator_address if coordinator_bind_address is None else coordinator_bind_address
    bind_host, bind_port = _check_address(bind, "coordinator_bind_address")
    if num_processes == 1:
        return
    if jax.distributed.is_initialized():
        raise RuntimeError("init_distributed: jax.distributed is already initialized.")
    n, pid = int(num_processes), int(process_id)
    deadline = time.monotonic() + float(init_timeout)
    if pid == 0:
        _gather(_listen(bind_host, bind_port, bind), n, deadline, coordinator_address, init_timeout)
    else:
        _join(host, port, pid, n, deadline, coordinator_address, init_timeout)
    # Every process is there: JAX's own wait (which aborts the process when it runs
    # out) now only covers the service starting on the port process 0 just released.
    jax.distributed.initialize(
        coordinator_address,
        n,
        pid,
        local_device_ids=local_device_ids,
        initialization_timeout=max(_JAX_START_S, math.ceil(init_timeout)),
        coordinator_bind_address=bind,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds,
    )
