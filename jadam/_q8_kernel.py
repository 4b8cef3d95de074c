"""A one-pass CPU kernel for Adam with both moments in blockwise 8 bits.

With `mu_dtype="q8", nu_dtype="q8"`, the plain-JAX update (decode, update the
moments, take each block's maximum, encode, compute the direction) is what
XLA runs on GPU and TPU. On the CPU, XLA splits it into a dozen loops,
materialises both float32 moments and copies the code arrays: about 6x
slower than a float32 step, with more temporaries than float32 state saves.
This kernel walks the moments block by block instead: each 256-entry block is
decoded, updated, re-encoded and turned into the direction while it sits in
cache, so the step reads g and 2 bytes of codes and writes the direction and
2 bytes of codes per parameter. The direction is written over the gradient's
buffer: inside a training step the gradients are a temporary and this costs
nothing; where they are an argument of the jitted function that is not
donated, XLA copies them first.

It is used by `scale_by_adam` (hence `adam` and `adamw`) for a float32
gradient leaf when both moments of that leaf are quantized with the same
block size and round to nearest, the hyperparameters are Python numbers,
AMSGrad and Nesterov are off, and the process sees a single device (a custom
call would gather sharded moments). Anything else takes the JAX path. The
arithmetic is the JAX path's, except that the bias corrections multiply by a
reciprocal: results agree to float32 rounding, and a stored code may differ by
one step where a value sits on a rounding boundary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _native
from jadam._quantize import SIGNED_MAP, UNSIGNED_MAP, QuantizedMoment

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
"""
_SOURCE += _native.PARALLEL_CC
# The two 8-bit formats (encode, decode), shared with `_packed`'s q8 kernel.
CODES_CC = r"""
static inline uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }
static inline float float_of(uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }

constexpr float pow2(int e) {
  return e == 0 ? 1.0f : e > 0 ? 2.0f * pow2(e - 1) : 0.5f * pow2(e + 1);
}

// 8-bit minifloats with 3 mantissa bits and exponent bias EMAX (jadam._quantize.Minifloat):
// signed e4m3 (EMAX 15, a sign bit) for the first moment, unsigned e5m3 (EMAX 31) for the second.
// Both directions are branch-free integer and float arithmetic that vectorizes (a 256-entry
// table compiles to gathers instead: the whole block update 5-7% slower, measured).
template <int EMAX, bool SIGNED>
struct Code {
  static constexpr int M = 3, SHIFT = 23 - M;
  static constexpr int32_t OFFSET = (127 - EMAX) << M;
  static constexpr uint32_t MAX_CODE = SIGNED ? 127 : 255;
  static constexpr float SUB_STEP = pow2(1 - EMAX - M);  // the subnormal range's spacing
  static constexpr float SMALLEST_NORMAL = pow2(1 - EMAX);
  // float32's spacing in [MAGIC, 2 MAGIC) is SUB_STEP: `x + MAGIC` rounds x to the
  // subnormal grid, to nearest even, as jnp.round(x / SUB_STEP) does.
  static constexpr float MAGIC = pow2(23 + 1 - EMAX - M);

  static inline float decode(uint8_t c8) {
    int32_t c = c8;
    int32_t mag = SIGNED ? (c & 0x7F) : c;
    uint32_t normal = uint32_t(mag + OFFSET) << SHIFT;  // the exponent field rebiased
    uint32_t sub = bits_of(float(mag) * SUB_STEP);
    uint32_t is_normal = 0u - uint32_t(mag >= (1 << M));  // a mask, not a branch
    uint32_t b = (normal & is_normal) | (sub & ~is_normal);
    if (SIGNED) b |= uint32_t(c & 0x80) << 24;
    return float_of(b);
  }

  // y in [-top, top]: round to nearest (ties of the normal range away from zero, of the
  // subnormal range to even, as the JAX path does). A NaN's code is irrelevant: its
  // block's scale is NaN.
  static inline uint8_t encode(float y) {
    float mag = std::fabs(y);  // nu's y is >= 0
    uint32_t normal = ((bits_of(mag) + (1u << (SHIFT - 1))) >> SHIFT) - uint32_t(OFFSET);
    uint32_t sub = bits_of(mag + MAGIC) - bits_of(MAGIC);
    uint32_t code = std::min(mag < SMALLEST_NORMAL ? sub : normal, MAX_CODE);
    if (SIGNED) return uint8_t(code | ((bits_of(y) >> 24) & 0x80u & (0u - uint32_t(code > 0))));
    return uint8_t(std::max(code, mag > 0.0f ? 1u : 0u));  // nu > 0 never decodes to 0
  }
};
using MuCode = Code<15, true>;
using NuCode = Code<31, false>;

// One block of `len` entries (pointers at its start): decode and update both moments from
// g, store the block maxima as the new scales, re-encode, and call `step(i, m_i, v_i)` with
// each entry's float32 moments (inlined into the vectorized loop). `m`, `v`: scratch.
struct MomentDecays {
  float b1, omb1, b2, omb2, top;
};

template <class Step>
static inline void q8_block_update(const float* g, uint8_t* mc, float& ms, uint8_t* vc,
                                   float& vs, int64_t len, const MomentDecays& h, float* m,
                                   float* v, Step step) {
  const float sm = ms, sv = vs;
  uint32_t am = 0, av = 0;  // max |x| as bit patterns: a NaN wins, as in jnp.max
#pragma omp simd reduction(max : am, av)
  for (int64_t i = 0; i < len; ++i) {
    float gi = g[i];
    float mi = h.b1 * (MuCode::decode(mc[i]) * sm) + h.omb1 * gi;
    float vi = h.b2 * (NuCode::decode(vc[i]) * sv) + h.omb2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    am = std::max(am, bits_of(mi) & 0x7FFFFFFFu);
    av = std::max(av, bits_of(vi) & 0x7FFFFFFFu);
  }
  ms = float_of(am) / h.top;
  vs = float_of(av) / h.top;
  const float inv_m = ms > 0.0f ? 1.0f / ms : 0.0f;
  const float inv_v = vs > 0.0f ? 1.0f / vs : 0.0f;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    mc[i] = MuCode::encode(m[i] * inv_m);
    vc[i] = NuCode::encode(v[i] * inv_v);
    step(i, m[i], v[i]);
  }
}

"""
_SOURCE += CODES_CC
_SOURCE += r"""
struct Hyper {
  MomentDecays decays;
  float rbc1, rbc2, eps, eps_root;
};

// One block [lo, hi): the moments, then the direction. `dir` may be `g` itself: a block's
// gradient is read in full before its direction is written.
static void block_step(const float* g, uint8_t* mc, float* ms, uint8_t* vc, float* vs,
                       float* dir, int64_t b, int64_t lo, int64_t hi, const Hyper& h,
                       float* m, float* v) {
  float* d = dir + lo;
  q8_block_update(g + lo, mc + lo, ms[b], vc + lo, vs[b], hi - lo, h.decays, m, v,
                  [&](int64_t i, float mi, float vi) {
                    d[i] = (mi * h.rbc1) / (std::sqrt(vi * h.rbc2 + h.eps_root) + h.eps);
                  });
}

static ffi::Error AdamQ8Impl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> mc_in,
                             ffi::Buffer<ffi::F32> ms_in, ffi::Buffer<ffi::U8> vc_in,
                             ffi::Buffer<ffi::F32> vs_in, ffi::Buffer<ffi::F32> sc,
                             ffi::ResultBuffer<ffi::F32> dir, ffi::ResultBuffer<ffi::U8> mc,
                             ffi::ResultBuffer<ffi::F32> ms, ffi::ResultBuffer<ffi::U8> vc,
                             ffi::ResultBuffer<ffi::F32> vs, float b1, float omb1, float b2,
                             float omb2, float eps_root, float top, int64_t block,
                             int64_t threads, ffi::ThreadPool pool) {
  const int64_t n = g.element_count();
  const int64_t nblocks = (n + block - 1) / block;
  if (block <= 0 || ms->element_count() != nblocks || vs->element_count() != nblocks ||
      mc->element_count() != n || vc->element_count() != n)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "codes/scales do not match the block");
  if (mc->typed_data() != mc_in.typed_data() || ms->typed_data() != ms_in.typed_data() ||
      vc->typed_data() != vc_in.typed_data() || vs->typed_data() != vs_in.typed_data())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moment outputs must alias inputs");
  const float* s = sc.typed_data();  // 1 / (1 - b1^t), 1 / (1 - b2^t), effective eps
  const Hyper h{{b1, omb1, b2, omb2, top}, s[0], s[1], s[2], eps_root};
  const float* G = g.typed_data();
  uint8_t* MC = mc->typed_data();
  uint8_t* VC = vc->typed_data();
  float* MS = ms->typed_data();
  float* VS = vs->typed_data();
  float* D = dir->typed_data();
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, 64));
  if (n < (1 << 16)) threads = 1;
  // Chunks of blocks (about 64K entries) handed out dynamically.
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / block);
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &next] {
    std::vector<float> scratch(2 * block);
    for (int64_t c = next.fetch_add(chunk); c < nblocks; c = next.fetch_add(chunk))
      for (int64_t b = c; b < std::min(nblocks, c + chunk); ++b)
        block_step(G, MC, MS, VC, VS, D, b, b * block, std::min(n, (b + 1) * block), h,
                   scratch.data(), scratch.data() + block);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamQ8Step, AdamQ8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("omb1")
                                  .Attr<float>("b2")
                                  .Attr<float>("omb2")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("top")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
"""

_TARGET = "jadam_adam_q8_step"
assert SIGNED_MAP.top == UNSIGNED_MAP.top  # the kernel divides both maxima by one `top`
assert (SIGNED_MAP.emax, UNSIGNED_MAP.emax, SIGNED_MAP.mantissa_bits) == (15, 31, 3)


def available() -> bool:
    """Whether the kernel is compiled and registered here (it compiles on first call)."""
    # No FMA contraction: the JAX path's roundings, so codes match it.
    flags = ("-fopenmp-simd", "-ffp-contract=off", "-mprefer-vector-width=512")
    return _native.load("adam_q8", _SOURCE, {"AdamQ8Step": _TARGET}, flags)


def applies(g: jax.Array, mu: Any, nu: Any, mu_store: Any, nu_store: Any, hyper) -> bool:
    """Whether this leaf's update can run on the kernel (see the module docstring)."""
    return (
        isinstance(mu, QuantizedMoment)
        and isinstance(nu, QuantizedMoment)
        and not (mu_store.stochastic or nu_store.stochastic)
        and mu_store.block_size == nu_store.block_size
        and _native.leaf_eligible(g, hyper)
        and available()
    )


def adam_q8_leaf(g, mu, nu, *, b1, b2, eps_root, block_size, inv_bc1, inv_bc2, eps, jax_path):
    """(direction, mu, nu) for one leaf: the kernel on CPU, `jax_path()` elsewhere.

    `inv_bc1`, `inv_bc2` and `eps` are float32 scalars (traced: they depend on
    the step); `jax_path` computes the same in plain JAX.
    """

    def native():
        scalars = jnp.stack([inv_bc1, inv_bc2, eps]).astype(jnp.float32)
        shapes = (
            jax.ShapeDtypeStruct(g.shape, jnp.float32),
            jax.ShapeDtypeStruct(mu.codes.shape, jnp.uint8),
            jax.ShapeDtypeStruct(mu.scales.shape, jnp.float32),
            jax.ShapeDtypeStruct(nu.codes.shape, jnp.uint8),
            jax.ShapeDtypeStruct(nu.scales.shape, jnp.float32),
        )
        call = jax.ffi.ffi_call(
            _TARGET,
            shapes,
            input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
            vmap_method="sequential",
        )
        d, mc, ms, vc, vs = call(
            g,
            mu.codes,
            mu.scales,
            nu.codes,
            nu.scales,
            scalars,
            b1=np.float32(b1),
            omb1=np.float32(1.0 - b1),
            b2=np.float32(b2),
            omb2=np.float32(1.0 - b2),
            eps_root=np.float32(eps_root),
            top=np.float32(SIGNED_MAP.top),
            block=np.int64(block_size),
            threads=np.int64(_native.cpu_threads()),
        )
        return d, QuantizedMoment(mc, ms), QuantizedMoment(vc, vs)

    return jax.lax.platform_dependent(cpu=native, default=jax_path)
