"""A one-pass CPU kernel for Adam with both moments in bf16, rounded stochastically.

With `mu_dtype` and `nu_dtype` both `StochasticRounding("bfloat16")`, the
plain-JAX update is what XLA runs on GPU and TPU. On the CPU, XLA re-reads the
old moments in the loop that computes the direction after the moment loops
have overwritten them in place, so it copies both moments first, and the
rounding's integer hash runs in loops of their own: 2-3x slower than a
float32 step, and it compiles for seconds per hundred leaves. This kernel
reads g and both bf16 moments, updates them, rounds them stochastically with
the JAX path's random bits and writes the direction over the gradient, in
one pass: 8 bytes read and 8 written per parameter.

Used by `scale_by_adam` (hence `adam` and `adamw`) under the same conditions
as `_q8_kernel` (a float32 gradient, Python-number hyperparameters, no
AMSGrad or Nesterov, one device). The stored moments are bit-identical to
the JAX path's (same float32 operations, no FMA contraction, the same hash);
the direction multiplies by the bias corrections' reciprocals, so it agrees
to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _native
from jadam._rounding import _GOLDEN, StochasticRounding, mix

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
"""
_SOURCE += _native.PARALLEL_CC
_SOURCE += r"""
static inline uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }
static inline float float_of(uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }

// jadam._rounding._lowbias32
static inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// jadam._rounding.round_with_word to bfloat16, for entry i of a leaf hashed with `word`.
static inline uint16_t round_bf16(float x, uint32_t i, uint32_t word) {
  uint32_t bits = bits_of(x);
  uint32_t noise = lowbias32((i * GOLDEN) ^ word) >> 16;
  bool finite = std::fabs(x) <= 3.4028234663852886e38f;  // false for inf and NaN
  uint32_t rounded = (finite ? bits + noise : bits) >> 16;
  return uint16_t(x != x ? 0x7FC0u : rounded);  // NaN -> the canonical bf16 NaN
}

struct Hyper {
  float b1, omb1, b2, omb2, rbc1, rbc2, eps, eps_root;
  uint32_t word_mu, word_nu;
};

// Entries [lo, hi): `dir` may be `g` itself (each entry is read before it is written).
static void bf16_step(const float* g, uint16_t* mu, uint16_t* nu, float* dir, int64_t lo,
                      int64_t hi, const Hyper& h) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float gi = g[i];
    float m = h.b1 * float_of(uint32_t(mu[i]) << 16) + h.omb1 * gi;
    float v = h.b2 * float_of(uint32_t(nu[i]) << 16) + h.omb2 * (gi * gi);
    mu[i] = round_bf16(m, uint32_t(i), h.word_mu);
    nu[i] = round_bf16(v, uint32_t(i), h.word_nu);
    dir[i] = (m * h.rbc1) / (std::sqrt(v * h.rbc2 + h.eps_root) + h.eps);
  }
}

static ffi::Error AdamBf16Impl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::BF16> mu_in,
                               ffi::Buffer<ffi::BF16> nu_in, ffi::Buffer<ffi::F32> sc,
                               ffi::Buffer<ffi::U32> words, ffi::ResultBuffer<ffi::F32> dir,
                               ffi::ResultBuffer<ffi::BF16> mu, ffi::ResultBuffer<ffi::BF16> nu,
                               float b1, float omb1, float b2, float omb2, float eps_root,
                               int64_t threads, ffi::ThreadPool pool) {
  const int64_t n = g.element_count();
  if (mu->element_count() != n || nu->element_count() != n)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moments do not match the gradient");
  if (mu->untyped_data() != mu_in.untyped_data() || nu->untyped_data() != nu_in.untyped_data())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moment outputs must alias inputs");
  const float* s = sc.typed_data();  // 1 / (1 - b1^t), 1 / (1 - b2^t), effective eps
  const uint32_t* w = words.typed_data();
  const Hyper h{b1, omb1, b2, omb2, s[0], s[1], s[2], eps_root, w[0], w[1]};
  const float* G = g.typed_data();
  uint16_t* MU = static_cast<uint16_t*>(mu->untyped_data());
  uint16_t* NU = static_cast<uint16_t*>(nu->untyped_data());
  float* D = dir->typed_data();
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, 64));
  if (n < (1 << 16)) threads = 1;
  const int64_t chunk = 1 << 16;  // entries per grab, handed out dynamically
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &next] {
    for (int64_t lo = next.fetch_add(chunk); lo < n; lo = next.fetch_add(chunk))
      bf16_step(G, MU, NU, D, lo, std::min(n, lo + chunk), h);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamBf16Step, AdamBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("omb1")
                                  .Attr<float>("b2")
                                  .Attr<float>("omb2")
                                  .Attr<float>("eps_root")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
""".replace("GOLDEN", f"0x{_GOLDEN:08X}u")

_TARGET = "jadam_adam_bf16_step"


def available() -> bool:
    """Whether the kernel is compiled and registered here (it compiles on first call)."""
    # No FMA contraction: the JAX path's roundings, so stored moments match it bit for bit.
    flags = ("-fopenmp-simd", "-ffp-contract=off", "-mprefer-vector-width=512")
    return _native.load("adam_bf16", _SOURCE, {"AdamBf16Step": _TARGET}, flags)


def applies(g: jax.Array, key: Any, mu_store: Any, nu_store: Any, hyper) -> bool:
    """Whether this leaf's update can run on the kernel (see the module docstring)."""
    bf16 = jnp.dtype(jnp.bfloat16)
    return (
        all(isinstance(s, StochasticRounding) for s in (mu_store, nu_store))
        and all(jnp.dtype(s.dtype) == bf16 for s in (mu_store, nu_store))
        and key is not None
        and _native.leaf_eligible(g, hyper)
        and available()
    )


def adam_bf16_leaf(g, mu, nu, key, *, mu_store, nu_store, b1, b2, eps_root, inv_bc1, inv_bc2,
                   eps, jax_path):  # fmt: skip
    """(direction, mu, nu) for one leaf: the kernel on CPU, `jax_path()` elsewhere.

    `key` is the leaf's random word; each storage mixes in its seed and stream
    as `StochasticRounding.write` does.
    """

    def native():
        scalars = jnp.stack([inv_bc1, inv_bc2, eps]).astype(jnp.float32)
        words = jnp.stack([mix(mix(key, s.seed), s.stream) for s in (mu_store, nu_store)]).astype(
            jnp.uint32
        )
        shapes = (
            jax.ShapeDtypeStruct(g.shape, jnp.float32),
            jax.ShapeDtypeStruct(mu.shape, jnp.bfloat16),
            jax.ShapeDtypeStruct(nu.shape, jnp.bfloat16),
        )
        call = jax.ffi.ffi_call(
            _TARGET, shapes, input_output_aliases={0: 0, 1: 1, 2: 2}, vmap_method="sequential"
        )
        return call(
            g,
            mu,
            nu,
            scalars,
            words,
            b1=np.float32(b1),
            omb1=np.float32(1.0 - b1),
            b2=np.float32(b2),
            omb2=np.float32(1.0 - b2),
            eps_root=np.float32(eps_root),
            threads=np.int64(_native.cpu_threads()),
        )

    return jax.lax.platform_dependent(cpu=native, default=jax_path)
