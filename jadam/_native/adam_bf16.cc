// Adam on one gradient leaf with both moments in bfloat16, rounded stochastically
// (jadam.StochasticRounding): read g and both moments, update, round with the JAX path's
// random bits and write the direction over the gradient, in one pass. Called by
// jadam._native.dispatch.adam_leaf.
#include "kernels.h"

namespace {

// jadam._rounding._GOLDEN (a test checks that the two agree).
constexpr uint32_t kGolden = 0x9E3779B9u;

// jadam._rounding._lowbias32
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// jadam._rounding.round_with_word to bfloat16, for entry i of a leaf hashed with `word`.
inline uint16_t round_bf16(float x, uint32_t i, uint32_t word) {
  uint32_t bits = bits_of(x);
  uint32_t noise = lowbias32((i * kGolden) ^ word) >> 16;
  bool finite = std::fabs(x) <= 3.4028234663852886e38f;  // false for inf and NaN
  uint32_t rounded = (finite ? bits + noise : bits) >> 16;
  return uint16_t(x != x ? 0x7FC0u : rounded);  // NaN -> the canonical bf16 NaN
}

struct Hyper {
  float b1, omb1, b2, omb2, rbc1, rbc2, eps, eps_root;
  uint32_t word_mu, word_nu;
};

// Entries [lo, hi): `dir` may be `g` itself (each entry is read before it is written).
void bf16_step(const float* g, uint16_t* mu, uint16_t* nu, float* dir, int64_t lo, int64_t hi,
               const Hyper& h) {
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

ffi::Error AdamBf16Impl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::BF16> mu_in,
                        ffi::Buffer<ffi::BF16> nu_in, ffi::Buffer<ffi::F32> sc,
                        ffi::Buffer<ffi::U32> words, ffi::ResultBuffer<ffi::F32> dir,
                        ffi::ResultBuffer<ffi::BF16> mu, ffi::ResultBuffer<ffi::BF16> nu,
                        float b1, float omb1, float b2, float omb2, float eps_root,
                        int64_t threads, ffi::ThreadPool pool) {
  const int64_t n = g.element_count();
  if (int64_t(mu->element_count()) != n || int64_t(nu->element_count()) != n)
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
  threads = resolve_threads(threads, n, 1 << 16);
  const int64_t chunk = 1 << 16;  // entries per grab, handed out dynamically
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &next] {
    for (int64_t lo = next.fetch_add(chunk); lo < n; lo = next.fetch_add(chunk))
      bf16_step(G, MU, NU, D, lo, std::min(n, lo + chunk), h);
  });
  return ffi::Error::Success();
}

}  // namespace

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
