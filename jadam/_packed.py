"""`packed_adam`: an Adam / AdamW step in one pass over memory (CPU, native kernel).

XLA's CPU backend compiles an Adam update-and-apply step into three loops
(m, v, then p), about 40 bytes moved per parameter instead of 28, and no
layout or flag changes that (measured: interleaved p/m/v buffers, chunked
`fori_loop`/`scan` over an interleaved buffer were 4-8x *slower*, three
updates per chunk copied the whole buffer every iteration, and no
`--xla_cpu_*` flag helped). `packed_adam` keeps the parameters and both
moments as flat vectors and updates them in place with one XLA FFI custom
call: a small C++ loop (vectorized, split over threads) that reads p, g, m, v
and writes p, m, v once, taking the gradients leaf by leaf (no
concatenation). With `moments="q8"` the moments are blockwise 8-bit codes
(`jadam.Quantized`'s format) decoded and re-encoded in the same pass.

This is NOT an optax transformation: it owns the parameters (read them back
with `params(state)`), supports only float32 parameters and the optax
convention of Adam / AdamW (schedules and a decay mask, no L2 or AMSGrad;
optax transformations of the gradients, such as clipping, run before it
through `gradient_transform`),
runs its native kernel on the CPU only, and allows no `vmap`/`grad` through
the step. The kernel (`jadam/_native/packed_adam.cc`) is compiled with the
system C++ compiler on first use, or ahead of time with
`python -m jadam.native build`, and cached (see `jadam.native_status()`);
where that fails, `step` warns once and falls back to the same arithmetic in
plain JAX (correct, at optax speed). Results equal `jadam.adam` /
`jadam.adamw` to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _numerics as nx
from jadam._flat import FlatLayout
from jadam._native import dispatch
from jadam._storage.quantized import SIGNED_MAP, UNSIGNED_MAP, QuantizedMoment, dequantize, quantize


def packed_native_available() -> bool:
    """Whether `packed_adam` runs its native kernel here (else the plain-JAX fallback)."""
    return dispatch.available("packed_adam")


class PackedAdamState(NamedTuple):
    """State of `packed_adam`: step count, flat float32 params and the two moments.

    The moments are flat float32 vectors, or `QuantizedMoment`s of them with
    `moments="q8"`.
    """

    count: jax.Array  # shape=(), int32
    params: jax.Array  # flat float32 parameters
    mu: Any
    nu: Any
    inner: Any = ()  # the state of `gradient_transform`, if any


Q8_BLOCK = 256  # jadam.Quantized's default block


class PackedAdam:
    """Built by `packed_adam`; see there."""

    def __init__(
        self, learning_rate, b1, b2, eps, eps_root, weight_decay, mask, moments, threads, grad_tx
    ):
        self.lr, self.b1, self.b2, self.eps, self.eps_root = learning_rate, b1, b2, eps, eps_root
        self.weight_decay, self.mask, self.moments = weight_decay, mask, moments
        self.grad_tx = grad_tx
        self.threads = threads or 0  # 0: the kernel's default, read when it runs
        self.layout: FlatLayout | None = None
        self.decays: np.ndarray | None = None  # per non-None leaf: 1.0 decays, 0.0 not

    def init(self, params: Any) -> PackedAdamState:
        """Flatten `params` (float32 leaves only) into a fresh state."""
        layout = FlatLayout(params)
        if set(layout.groups) - {"float32"}:
            raise TypeError(f"packed_adam takes float32 parameters only, got {set(layout.groups)}")
        mask = self.mask(params) if callable(self.mask) else self.mask
        leaves = layout.treedef.flatten_up_to(params)
        flags = [True] * len(leaves) if mask is None else _like_params(layout, mask, "mask")
        self.decays = np.array(
            [float(bool(f)) for f, p in zip(flags, leaves, strict=True) if p is not None],
            np.float32,
        )
        self.layout = layout
        flat = layout.ravel(params).get("float32", jnp.zeros(0, jnp.float32))
        inner = self.grad_tx.init(params) if self.grad_tx is not None else ()
        zeros = jnp.zeros([], jnp.int32)
        return PackedAdamState(zeros, flat, self._zeros(flat), self._zeros(flat), inner)

    def _zeros(self, flat: jax.Array) -> Any:
        if self.moments == "q8":
            blocks = -(-flat.size // Q8_BLOCK)
            return QuantizedMoment(jnp.zeros(flat.shape, jnp.uint8), jnp.zeros(blocks, jnp.float32))
        return jnp.zeros_like(flat)

    def params(self, state: PackedAdamState) -> Any:
        """The parameter tree (slices of the flat vector: free under jit)."""
        layout = self._layout()
        return layout.unravel({"float32": state.params} if layout.groups else {})

    def _layout(self) -> FlatLayout:
        if self.layout is None:
            raise ValueError("call init(params) first")
        return self.layout

    def step(self, state: PackedAdamState, grads: Any) -> PackedAdamState:
        """One Adam update-and-apply. Jit it with `donate_argnums=0` to update in place."""
        layout = self._layout()
        inner = state.inner
        if self.grad_tx is not None:
            grads, inner = self.grad_tx.update(grads, inner, self.params(state))
        grad_leaves = _like_params(layout, grads, "grads")
        for g, shape in zip(grad_leaves, layout.shapes, strict=True):
            if (g is None) != (shape is None) or (g is not None and tuple(g.shape) != shape):
                got = None if g is None else tuple(g.shape)
                raise ValueError(f"grads must have the params' shapes: got {got}, want {shape}")
        leaves = [g for g in grad_leaves if g is not None]
        if any(jnp.dtype(g.dtype) != jnp.float32 for g in leaves):
            raise TypeError("packed_adam takes float32 gradients only")
        # Schedules see the steps taken before this one, as optax's do.
        lr = self.lr(state.count) if callable(self.lr) else self.lr
        wd = self.weight_decay(state.count) if callable(self.weight_decay) else self.weight_decay
        count = jnp.where(state.count < jnp.iinfo(jnp.int32).max, state.count + 1, state.count)
        c = count.astype(jnp.float32)
        inv_bc1 = 1.0 / -jnp.expm1(c * math.log(self.b1)) if self.b1 else jnp.float32(1)
        inv_bc2 = 1.0 / -jnp.expm1(c * math.log(self.b2)) if self.b2 else jnp.float32(1)
        scalars = jnp.stack([inv_bc1, inv_bc2, -jnp.asarray(lr), jnp.asarray(wd)])
        scalars = scalars.astype(jnp.float32)

        def jax_path():
            flat_grads = layout.ravel(grads).get("float32", jnp.zeros(0, jnp.float32))
            return self._jax_step(state, scalars, flat_grads)

        p, mu, nu = dispatch.packed_step(
            state.params, state.mu, state.nu, scalars, self.decays, leaves, b1=self.b1,
            b2=self.b2, eps=self.eps, eps_root=self.eps_root, threads=self.threads,
            block=Q8_BLOCK, jax_path=jax_path,
        )  # fmt: skip
        return PackedAdamState(count, p, mu, nu, inner)

    def _jax_step(self, state, scalars, g):
        """(params, mu, nu): the kernels' arithmetic in plain JAX (no compiler, or not on
        a CPU)."""
        inv_bc1, inv_bc2, neg_lr, wd = scalars
        q8 = self.moments == "q8"
        mu = dequantize(state.mu, SIGNED_MAP, Q8_BLOCK) if q8 else state.mu
        nu = dequantize(state.nu, UNSIGNED_MAP, Q8_BLOCK) if q8 else state.nu
        m = self.b1 * mu + (1.0 - self.b1) * g
        v = self.b2 * nu + (1.0 - self.b2) * (g * g)
        d = (m * inv_bc1) / (jnp.sqrt(v * inv_bc2 + self.eps_root) + self.eps)
        sizes = [math.prod(s) for s in self._layout().shapes if s is not None]
        decays = jnp.repeat(self.decays, np.array(sizes), total_repeat_length=g.size)
        p = state.params + (d + wd * decays * state.params) * neg_lr
        if q8:
            m, v = quantize(m, SIGNED_MAP, Q8_BLOCK), quantize(v, UNSIGNED_MAP, Q8_BLOCK)
        return p, m, v


def _like_params(layout: FlatLayout, tree: Any, name: str) -> list[Any]:
    """The leaves of `tree`, which must have the structure of the params given to init."""
    try:
        return layout.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must have the structure of the params given to init: {err}"
        ) from None


def packed_adam(
    learning_rate: Any = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: Any = 0.0,
    mask: Any = None,
    moments: str = "float32",
    threads: int | None = None,
    gradient_transform: optax.GradientTransformation | None = None,
) -> PackedAdam:
    """Adam / AdamW on packed float32 state, one pass over memory per step (CPU).

    Same formulas as `jadam.adam` (optax convention) and, with `weight_decay`,
    `jadam.adamw`: `p -= learning_rate * (direction + weight_decay * p)`.
    Returns an object with `init(params) -> state`, a jittable
    `step(state, grads) -> state` (grads shaped like the params) and
    `params(state) -> tree`. Not an optax transformation; see the module
    docstring for what it leaves out.

    Args:
      learning_rate: step size, >= 0, or an optax schedule (called with the
        number of steps taken before this one, as optax does).
      b1, b2: decays of the moments, in [0, 1).
      eps, eps_root: added to the denominator / inside its square root, >= 0.
      weight_decay: decoupled weight decay, >= 0, or a schedule (0: plain Adam).
      mask: which leaves decay: a pytree of booleans shaped like the params, or
        a function of the params returning one (as `optax.add_decayed_weights`).
      moments: `"float32"`, or `"q8"` for both moments in blockwise 8 bits over
        the flat vector (`jadam.Quantized`'s format and 256-entry block; a block
        may span two leaves): 2.03 bytes of state per parameter instead of 8,
        and one pass reading 10 bytes and writing 6 per parameter.
      threads: CPU threads for the kernel (default: the cores this process may use).
      gradient_transform: an optax transformation applied to the gradients
        before the Adam step, e.g. `optax.clip_by_global_norm(1.0)` (then the
        step equals `optax.chain(gradient_transform, jadam.adamw(...))`). It
        runs in XLA on the gradient tree; its state is `state.inner`.

    Example:
      >>> import functools, jax, jax.numpy as jnp, jadam
      >>> opt = jadam.packed_adam(0.1)
      >>> state = opt.init({"w": jnp.array([1.0, -2.0])})
      >>> step = jax.jit(opt.step, donate_argnums=0)
      >>> state = step(state, {"w": jnp.array([0.5, -0.5])})
      >>> opt.params(state)["w"]
      Array([ 0.9, -1.9], dtype=float32)
    """
    # The kernel bakes b1, b2, eps and eps_root in as constants: numbers, not schedules.
    for name, value in [("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)]:
        if callable(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    for name, value in [("learning_rate", learning_rate), ("weight_decay", weight_decay)]:
        nx.check_nonnegative(name, value)
        nx.check_finite(name, value)
    nx.check_decay("b1", b1)
    nx.check_decay("b2", b2)
    for name, value in [("eps", eps), ("eps_root", eps_root)]:
        nx.check_nonnegative(name, value)
        nx.check_finite(name, value)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if moments not in ("float32", "q8"):
        raise ValueError(f"moments must be 'float32' or 'q8', got {moments!r}")
    if gradient_transform is not None and not (
        callable(getattr(gradient_transform, "init", None))
        and callable(getattr(gradient_transform, "update", None))
    ):
        raise TypeError(
            "gradient_transform must be an optax.GradientTransformation (with init and "
            f"update), e.g. optax.clip_by_global_norm(1.0); got {gradient_transform!r}"
        )
    hyper = (float(b1), float(b2), float(eps), float(eps_root))
    return PackedAdam(
        learning_rate, *hyper, weight_decay, mask, moments, threads, gradient_transform
    )
