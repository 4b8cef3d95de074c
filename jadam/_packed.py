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
the step. The kernel is compiled with the system C++ compiler (`CXX`, else
`g++`) on first use and cached under `$XDG_CACHE_HOME/jadam` (default
`~/.cache/jadam`, see `_native`); where that fails, `step` falls back to the
same arithmetic in plain JAX (correct, at optax speed). Results equal
`jadam.adam` / `jadam.adamw` to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _native, _q8_kernel
from jadam import _numerics as nx
from jadam._fused import FlatLayout
from jadam._quantize import SIGNED_MAP, UNSIGNED_MAP, QuantizedMoment, dequantize, quantize

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
"""
_SOURCE += (
    _native.PARALLEL_CC
    + _q8_kernel.CODES_CC
    + r"""
struct Hyper {
  float b1, omb1, b2, omb2, rbc1, rbc2, eps, eps_root, neglr;
};

// p, m, v updated in place over [lo, hi); g is indexed like p. `wd`: decoupled weight
// decay, p += -lr * (direction + wd * p) (0: plain Adam, the same value to the bit).
static void kernel(float* p, float* m, float* v, const float* g, int64_t lo, int64_t hi,
                   Hyper h, float wd) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float gi = g[i];
    float mi = h.b1 * m[i] + h.omb1 * gi;
    float vi = h.b2 * v[i] + h.omb2 * (gi * gi);
    float d = (mi * h.rbc1) / (std::sqrt(vi * h.rbc2 + h.eps_root) + h.eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] + (d + wd * p[i]) * h.neglr;
  }
}

struct Seg {
  const float* g;
  int64_t off, len;
  float wd;
};

static void seg_kernel(float* p, float* m, float* v, const std::vector<Seg>* segs, int64_t lo,
                       int64_t hi, Hyper h) {
  for (const Seg& s : *segs) {
    int64_t a = std::max(lo, s.off), b = std::min(hi, s.off + s.len);
    if (a < b) kernel(p, m, v, s.g - s.off, a, b, h, s.wd);  // g[i - off], i in [a, b)
  }
}

// The gradient leaves, in order, as segments of the flat vector of n entries.
static ffi::Error collect_segments(ffi::Buffer<ffi::F32>& decays, ffi::RemainingArgs& grads,
                                   float wd, int64_t n, std::vector<Seg>& segs) {
  if (decays.element_count() != grads.size())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "one decay flag per gradient");
  int64_t off = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    auto g = grads.get<ffi::Buffer<ffi::F32>>(k);
    if (!g.has_value()) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "f32 grads only");
    segs.push_back({g->typed_data(), off, (int64_t)g->element_count(),
                    wd * decays.typed_data()[k]});
    off += g->element_count();
  }
  if (off != n) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "grad sizes differ");
  return ffi::Error::Success();
}

static ffi::Error AdamTreeImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> m,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> sc,
                               ffi::Buffer<ffi::F32> decays, ffi::RemainingArgs grads,
                               ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::F32> mo,
                               ffi::ResultBuffer<ffi::F32> vo,
                               float b1, float omb1, float b2, float omb2, float eps,
                               float eps_root, int64_t threads, ffi::ThreadPool pool) {
  int64_t n = p.element_count();
  float* P = po->typed_data();
  float* M = mo->typed_data();
  float* V = vo->typed_data();
  if (P != p.typed_data() || M != m.typed_data() || V != v.typed_data())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "outputs must alias inputs");
  const float* s = sc.typed_data();  // 1 / (1 - b1^t), 1 / (1 - b2^t), -lr, weight decay
  std::vector<Seg> segs;
  ffi::Error err = collect_segments(decays, grads, s[3], n, segs);
  if (err.failure()) return err;
  Hyper h{b1, omb1, b2, omb2, s[0], s[1], eps, eps_root, s[2]};
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, 64));
  if (n < (1 << 16)) threads = 1;
  // Blocks of 64K parameters handed out dynamically, so that a thread slowed
  // by a neighbour does not hold up the step.
  const int64_t block = 1 << 16;
  const int64_t nblocks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &segs, &next] {
    for (int64_t b = next.fetch_add(1); b < nblocks; b = next.fetch_add(1))
      seg_kernel(P, M, V, &segs, b * block, std::min(n, (b + 1) * block), h);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamTreeStep, AdamTreeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("omb1")
                                  .Attr<float>("b2")
                                  .Attr<float>("omb2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

// q8 moments: the blockwise 8-bit format of jadam.Quantized (block `block`) over the flat
// vectors. One block: gather its gradients (a block may span leaves), decode and update
// the moments, take the block maxima, encode, and apply the step to p.
struct HyperQ8 {
  MomentDecays decays;
  float rbc1, rbc2, eps, eps_root, neglr;
};

static void q8_block(float* p, uint8_t* mc, float* ms, uint8_t* vc, float* vs,
                     const std::vector<Seg>& segs, int64_t b, int64_t lo, int64_t hi,
                     const HyperQ8& h, float* g, float* wd, float* m, float* v) {
  size_t k = std::upper_bound(segs.begin(), segs.end(), lo,
                              [](int64_t i, const Seg& s) { return i < s.off; }) -
             segs.begin() - 1;
  float* pb = p + lo;
  auto update = [&](const float* gb, auto decay) {
    q8_block_update(gb, mc + lo, ms[b], vc + lo, vs[b], hi - lo, h.decays, m, v,
                    [&](int64_t i, float mi, float vi) {
                      float d = (mi * h.rbc1) / (std::sqrt(vi * h.rbc2 + h.eps_root) + h.eps);
                      pb[i] = pb[i] + (d + decay(i) * pb[i]) * h.neglr;
                    });
  };
  const Seg& first = segs[k];
  if (hi <= first.off + first.len) {  // within one leaf: read its gradient in place
    const float wd_leaf = first.wd;
    update(first.g + (lo - first.off), [=](int64_t) { return wd_leaf; });
    return;
  }
  for (int64_t i = lo; i < hi; ++k) {  // across leaves: gather the gradients
    const Seg& s = segs[k];
    for (const int64_t end = std::min(hi, s.off + s.len); i < end; ++i) {
      g[i - lo] = s.g[i - s.off];
      wd[i - lo] = s.wd;
    }
  }
  update(g, [=](int64_t i) { return wd[i]; });
}

static ffi::Error AdamQ8TreeImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::U8> mc_in,
                                 ffi::Buffer<ffi::F32> ms_in, ffi::Buffer<ffi::U8> vc_in,
                                 ffi::Buffer<ffi::F32> vs_in, ffi::Buffer<ffi::F32> sc,
                                 ffi::Buffer<ffi::F32> decays, ffi::RemainingArgs grads,
                                 ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::U8> mc,
                                 ffi::ResultBuffer<ffi::F32> ms, ffi::ResultBuffer<ffi::U8> vc,
                                 ffi::ResultBuffer<ffi::F32> vs, float b1, float omb1, float b2,
                                 float omb2, float eps, float eps_root, float top, int64_t block,
                                 int64_t threads, ffi::ThreadPool pool) {
  const int64_t n = p.element_count();
  const int64_t nblocks = (n + block - 1) / block;
  if (block <= 0 || ms->element_count() != nblocks || vs->element_count() != nblocks ||
      mc->element_count() != n || vc->element_count() != n)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "codes/scales do not match the block");
  if (po->typed_data() != p.typed_data() || mc->typed_data() != mc_in.typed_data() ||
      ms->typed_data() != ms_in.typed_data() || vc->typed_data() != vc_in.typed_data() ||
      vs->typed_data() != vs_in.typed_data())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "outputs must alias inputs");
  const float* s = sc.typed_data();  // 1 / (1 - b1^t), 1 / (1 - b2^t), -lr, weight decay
  std::vector<Seg> segs;
  ffi::Error err = collect_segments(decays, grads, s[3], n, segs);
  if (err.failure()) return err;
  const HyperQ8 h{{b1, omb1, b2, omb2, top}, s[0], s[1], eps, eps_root, s[2]};
  float* P = po->typed_data();
  uint8_t* MC = mc->typed_data();
  uint8_t* VC = vc->typed_data();
  float* MS = ms->typed_data();
  float* VS = vs->typed_data();
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, 64));
  if (n < (1 << 16)) threads = 1;
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / block);  // blocks per grab
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &segs, &next] {
    std::vector<float> scratch(4 * block);
    float* sp = scratch.data();
    for (int64_t c = next.fetch_add(chunk); c < nblocks; c = next.fetch_add(chunk))
      for (int64_t b = c; b < std::min(nblocks, c + chunk); ++b)
        q8_block(P, MC, MS, VC, VS, segs, b, b * block, std::min(n, (b + 1) * block), h, sp,
                 sp + block, sp + 2 * block, sp + 3 * block);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamQ8TreeStep, AdamQ8TreeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("omb1")
                                  .Attr<float>("b2")
                                  .Attr<float>("omb2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("top")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
"""
)

_TARGET = "jadam_packed_adam_step"
_TARGET_Q8 = "jadam_packed_adam_q8_step"


def _build() -> bool:
    """Compile, load and register the kernels once; False if that is impossible."""
    # No FMA contraction: XLA's roundings, so q8 codes match the JAX path's.
    flags = ("-ffp-contract=off", "-fopenmp-simd", "-mprefer-vector-width=512")
    symbols = {"AdamTreeStep": _TARGET, "AdamQ8TreeStep": _TARGET_Q8}
    return _native.load("packed_adam", _SOURCE, symbols, flags)


def packed_native_available() -> bool:
    """Whether `packed_adam` runs its native kernel here (else the plain-JAX fallback)."""
    return _build()


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
        self.threads = threads or _native.cpu_threads()
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
        return self._layout().unravel({"float32": state.params})

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
        if _build() and jax.default_backend() == "cpu" and state.params.size:
            new = self._native_step(state, count, scalars, leaves)
        else:
            flat_grads = layout.ravel(grads).get("float32", jnp.zeros(0, jnp.float32))
            new = self._jax_step(state, count, scalars, flat_grads)
        return new._replace(inner=inner)

    def _native_step(self, state, count, scalars, leaves) -> PackedAdamState:
        hyper = {
            "b1": np.float32(self.b1),
            "omb1": np.float32(1.0 - self.b1),
            "b2": np.float32(self.b2),
            "omb2": np.float32(1.0 - self.b2),
            "eps": np.float32(self.eps),
            "eps_root": np.float32(self.eps_root),
            "threads": np.int64(self.threads),
        }
        decays, grads = jnp.asarray(self.decays), [g.reshape(-1) for g in leaves]
        if self.moments == "q8":
            mu, nu = state.mu, state.nu
            out = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state.params, *mu, *nu)
            )
            call = jax.ffi.ffi_call(_TARGET_Q8, out, input_output_aliases={i: i for i in range(5)})
            p, *codes = call(
                state.params,
                *mu,
                *nu,
                scalars,
                decays,
                *grads,
                top=np.float32(_q8_kernel.SIGNED_MAP.top),
                block=np.int64(Q8_BLOCK),
                **hyper,
            )
            return PackedAdamState(
                count, p, QuantizedMoment(*codes[:2]), QuantizedMoment(*codes[2:])
            )
        out = (jax.ShapeDtypeStruct(state.params.shape, jnp.float32),) * 3
        call = jax.ffi.ffi_call(_TARGET, out, input_output_aliases={0: 0, 1: 1, 2: 2})
        p, m, v = call(state.params, state.mu, state.nu, scalars, decays, *grads, **hyper)
        return PackedAdamState(count, p, m, v)

    def _jax_step(self, state, count, scalars, g) -> PackedAdamState:
        """The kernels' arithmetic in plain JAX (no compiler, or not on a CPU)."""
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
        return PackedAdamState(count, p, m, v)


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
