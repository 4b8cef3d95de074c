// Shared by jadam's CPU kernels (jadam/_native/*.cc): bit casts, the thread-pool helper
// and the 8-bit moment codes. Every kernel is one translation unit that includes this
// header, compiled into its own shared library and called through XLA FFI.
#ifndef JADAM_NATIVE_KERNELS_H_
#define JADAM_NATIVE_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__AVX2__) && !defined(__AVX512BW__)
#include <immintrin.h>
#define JADAM_AVX2_CODES 1  // AVX2 without AVX-512: encode_block's intrinsics
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// ---------------------------------------------------------------------------------------
// Threads

// The default thread count: JADAM_NATIVE_THREADS if it is a positive integer, else the
// CPUs this process may run on. Read once, at the first kernel call, so that it follows
// the machine a compiled program runs on, not the one that traced it.
inline int64_t default_threads() {
  static const int64_t value = [] {
    if (const char* env = std::getenv("JADAM_NATIVE_THREADS")) {
      char* end = nullptr;
      long n = std::strtol(env, &end, 10);
      if (end != env && *end == '\0' && n > 0) return int64_t(n);
    }
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return int64_t(CPU_COUNT(&set));
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return value;
}

// Threads for one call: `requested` if positive (an explicit argument), else the default;
// at most 64, and one where the work (`size` against `min_size`) is too small to share.
inline int64_t resolve_threads(int64_t requested, int64_t size, int64_t min_size) {
  if (size < min_size) return 1;
  int64_t threads = requested > 0 ? requested : default_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, 64));
}

// `run_parallel(threads, pool, work)` calls `work()` on the caller and on up to
// `threads - 1` helpers from XLA's intra-op pool (its threads would otherwise spin beside
// ours; plain std::threads where it has none). `work` must take its share from a shared
// counter until none is left. The caller never waits for a helper that has not started:
// XLA may run several kernels at once on that pool, and a helper queued behind a busy
// pool thread would deadlock the step. Late helpers find the work closed and return; the
// state they touch is shared-owned.
struct ParallelState {
  std::atomic<int64_t> active{0};
  std::atomic<bool> closed{false};
};

template <class Work>
inline void run_parallel(int64_t threads, ffi::ThreadPool& pool, Work work) {
  auto state = std::make_shared<ParallelState>();
  auto helper = [state, work] {
    state->active.fetch_add(1);
    if (!state->closed.load()) work();
    state->active.fetch_sub(1);
  };
  std::vector<std::thread> spawned;
  for (int64_t t = 1; t < threads; ++t) {
    if (pool.num_threads() > 0)
      pool.Schedule(decltype(helper)(helper));
    else
      spawned.emplace_back(helper);
  }
  work();
  state->closed.store(true);
  for (auto& t : spawned) t.join();
  while (state->active.load() > 0) std::this_thread::yield();
}

// ---------------------------------------------------------------------------------------
// 8-bit moment codes (jadam._quantize): encode, decode, one block's update

constexpr float kFloatMax = 3.4028234663852886e38f;

constexpr float pow2(int e) {
  return e == 0 ? 1.0f : e > 0 ? 2.0f * pow2(e - 1) : 0.5f * pow2(e + 1);
}

// 8-bit minifloats with 3 mantissa bits and exponent bias EMAX (jadam._quantize.Minifloat):
// signed e4m3 (EMAX 15, a sign bit) for the first moment, unsigned e5m3 (EMAX 31) for the
// second. Both directions are branch-free integer and float arithmetic that vectorizes (a
// 256-entry table compiles to gathers instead, and the whole block update runs slower).
template <int EMAX, bool SIGNED>
struct Code {
  static constexpr int M = 3, SHIFT = 23 - M;
  static constexpr int32_t OFFSET = (127 - EMAX) << M;
  static constexpr bool SIGNED_CODE = SIGNED;
  static constexpr uint32_t MAX_CODE = SIGNED ? 127 : 255;
  // jadam._quantize.Minifloat.nan_code: a negative zero, never written for a number.
  static constexpr uint32_t NAN_CODE = 0x80;
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
    if (SIGNED) {
      b |= uint32_t(c & 0x80) << 24;
      uint32_t is_nan = 0u - uint32_t(c == int32_t(NAN_CODE));
      b = (b & ~is_nan) | (0x7FC00000u & is_nan);
    }
    return float_of(b);
  }

  // y in [-top, top]: round to nearest (ties of the normal range away from zero, of the
  // subnormal range to even, as the JAX path does). NaN and +-inf: the signed map's
  // reserved NAN_CODE; the unsigned map's largest code.
  //
  // |y| is compared as a bit pattern (monotonic for non-negative floats, NaN above inf)
  // and the two ranges are merged with a mask: GCC sinks a float addition into the arm of
  // a select that uses it, then will not speculate it (it may trap) without AVX-512's
  // masked instructions, and the whole loop stayed scalar on AVX2.
  static inline uint8_t encode(float y) {
    float mag = std::fabs(y);  // nu's y is >= 0
    uint32_t mbits = bits_of(mag);
    uint32_t normal = ((mbits + (1u << (SHIFT - 1))) >> SHIFT) - uint32_t(OFFSET);
    uint32_t sub = bits_of(mag + MAGIC) - bits_of(MAGIC);
    uint32_t is_sub = 0u - uint32_t(mbits < bits_of(SMALLEST_NORMAL));
    uint32_t code = std::min((sub & is_sub) | (normal & ~is_sub), MAX_CODE);
    if (SIGNED) {
      code |= (bits_of(y) >> 24) & 0x80u & (0u - uint32_t(code > 0));
      uint32_t finite = 0u - uint32_t(mbits <= bits_of(kFloatMax));  // 0 for NaN and inf
      return uint8_t((code & finite) | (NAN_CODE & ~finite));
    }
    // nu > 0 never decodes to 0 (NaN's bits are nonzero too, and its code is already 255).
    return uint8_t(std::max(code, mbits != 0 ? 1u : 0u));
  }
};
using MuCode = Code<15, true>;
using NuCode = Code<31, false>;

#if JADAM_AVX2_CODES
// Code<...>::encode on 8 lanes, as 32-bit codes. GCC vectorizes the scalar encode on AVX2
// too, but packs every lane's result to a byte with long shuffle chains; here four such
// vectors are packed at once (encode_block), and the selects are single blends.
template <class C>
inline __m256i encode8(__m256 y) {
  const __m256i yb = _mm256_castps_si256(y);
  const __m256i mbits = _mm256_and_si256(yb, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256 mag = _mm256_castsi256_ps(mbits);
  const __m256i normal = _mm256_sub_epi32(
      _mm256_srli_epi32(_mm256_add_epi32(mbits, _mm256_set1_epi32(1 << (C::SHIFT - 1))),
                        C::SHIFT),
      _mm256_set1_epi32(C::OFFSET));
  const __m256i sub =
      _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(mag, _mm256_set1_ps(C::MAGIC))),
                       _mm256_set1_epi32(int32_t(bits_of(C::MAGIC))));
  // mbits is non-negative as an int32 (NaN above inf), so signed comparisons order it.
  const __m256i is_sub =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(bits_of(C::SMALLEST_NORMAL))), mbits);
  __m256i code = _mm256_blendv_epi8(normal, sub, is_sub);
  code = _mm256_min_epu32(code, _mm256_set1_epi32(int32_t(C::MAX_CODE)));
  if (C::SIGNED_CODE) {
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(yb, 24), _mm256_set1_epi32(0x80));
    code = _mm256_or_si256(
        code, _mm256_and_si256(sign, _mm256_cmpgt_epi32(code, _mm256_setzero_si256())));
    const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(0x7F800000)), mbits);
    return _mm256_blendv_epi8(_mm256_set1_epi32(int32_t(C::NAN_CODE)), code, finite);
  }
  const __m256i nonzero = _mm256_cmpgt_epi32(mbits, _mm256_setzero_si256());
  return _mm256_max_epu32(code, _mm256_and_si256(nonzero, _mm256_set1_epi32(1)));
}
#endif

// codes[i] = C::encode(x[i] * inv) for i < len.
template <class C>
inline void encode_block(const float* x, float inv, uint8_t* codes, int64_t len) {
  int64_t i = 0;
#if JADAM_AVX2_CODES
  const __m256 s = _mm256_set1_ps(inv);
  // The byte packs work within 128-bit halves; this puts the 32 codes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= len; i += 32) {
    __m256i c[4];
    for (int k = 0; k < 4; ++k)
      c[k] = encode8<C>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), s));
    const __m256i lo = _mm256_packus_epi32(c[0], c[1]), hi = _mm256_packus_epi32(c[2], c[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), bytes);
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < len; ++j) codes[j] = C::encode(x[j] * inv);
}

// One block of `len` entries (pointers at its start): decode and update both moments from
// g, store the block maxima as the new scales, re-encode, and call `step(i, m_i, v_i)` with
// each entry's float32 moments (inlined into the vectorized loop). `m`, `v`: scratch.
struct MomentDecays {
  float b1, omb1, b2, omb2, top;
};

// 1 / a block's scale, 0 for a zero scale (jadam._quantize.quantize). Capped where a
// subnormal scale's reciprocal would overflow (where subnormals are not flushed to zero):
// a finite entry then never scales to inf, or to NaN (inf * 0), so never takes NAN_CODE.
inline float block_inverse(float scale) {
  return scale > 0.0f ? std::min(1.0f / scale, kFloatMax) : 0.0f;
}

template <class Step>
inline void q8_block_update(const float* g, uint8_t* mc, float& ms, uint8_t* vc, float& vs,
                            int64_t len, const MomentDecays& h, float* m, float* v, Step step) {
  const float sm = ms, sv = vs;
  // The largest finite |x|, as bit patterns (NaN and inf are left out, as the JAX path
  // does: one bad entry must not spoil its block).
  constexpr uint32_t kInfBits = 0x7F800000u;
  uint32_t am = 0, av = 0;
#pragma omp simd reduction(max : am, av)
  for (int64_t i = 0; i < len; ++i) {
    float gi = g[i];
    float mi = h.b1 * (MuCode::decode(mc[i]) * sm) + h.omb1 * gi;
    float vi = h.b2 * (NuCode::decode(vc[i]) * sv) + h.omb2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    uint32_t ai = bits_of(mi) & 0x7FFFFFFFu, bi = bits_of(vi) & 0x7FFFFFFFu;
    am = std::max(am, ai < kInfBits ? ai : 0u);
    av = std::max(av, bi < kInfBits ? bi : 0u);
  }
  ms = float_of(am) / h.top;
  vs = float_of(av) / h.top;
  const float inv_m = block_inverse(ms), inv_v = block_inverse(vs);
#if JADAM_AVX2_CODES
  encode_block<MuCode>(m, inv_m, mc, len);
  encode_block<NuCode>(v, inv_v, vc, len);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) step(i, m[i], v[i]);
#else  // one loop: with AVX-512 (or without AVX2) the compiler vectorizes it whole
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    mc[i] = MuCode::encode(m[i] * inv_m);
    vc[i] = NuCode::encode(v[i] * inv_v);
    step(i, m[i], v[i]);
  }
#endif
}

#endif  // JADAM_NATIVE_KERNELS_H_
