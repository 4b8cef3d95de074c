// `jadam.packed_adam`: an Adam / AdamW step over flat float32 parameters and moments (or
// blockwise 8-bit moments) in place, in one pass, taking the gradients leaf by leaf.
// Called by jadam._native.dispatch.packed_step.
#include "kernels.h"

namespace {

struct Hyper {
  float b1, omb1, b2, omb2, rbc1, rbc2, eps, eps_root, neglr;
};

// p, m, v updated in place over [lo, hi); g is indexed like p. `wd`: decoupled weight
// decay, p += -lr * (direction + wd * p) (0: plain Adam, the same value to the bit).
void kernel(float* p, float* m, float* v, const float* g, int64_t lo, int64_t hi,
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

void seg_kernel(float* p, float* m, float* v, const std::vector<Seg>* segs, int64_t lo,
                       int64_t hi, Hyper h) {
  for (const Seg& s : *segs) {
    int64_t a = std::max(lo, s.off), b = std::min(hi, s.off + s.len);
    if (a < b) kernel(p, m, v, s.g - s.off, a, b, h, s.wd);  // g[i - off], i in [a, b)
  }
}

// The gradient leaves, in order, as segments of the flat vector of n entries.
ffi::Error collect_segments(ffi::Buffer<ffi::F32>& decays, ffi::RemainingArgs& grads,
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

ffi::Error AdamTreeImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> m,
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
  threads = resolve_threads(threads, n, 1 << 16);
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

}  // namespace

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

namespace {

// q8 moments: the blockwise 8-bit format of jadam.Quantized (block `block`) over the flat
// vectors. One block: gather its gradients (a block may span leaves), decode and update
// the moments, take the block maxima, encode, and apply the step to p.
struct HyperQ8 {
  MomentDecays decays;
  float rbc1, rbc2, eps, eps_root, neglr;
};

void q8_block(float* p, uint8_t* mc, float* ms, uint8_t* vc, float* vs,
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

ffi::Error AdamQ8TreeImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::U8> mc_in,
                                 ffi::Buffer<ffi::F32> ms_in, ffi::Buffer<ffi::U8> vc_in,
                                 ffi::Buffer<ffi::F32> vs_in, ffi::Buffer<ffi::F32> sc,
                                 ffi::Buffer<ffi::F32> decays, ffi::RemainingArgs grads,
                                 ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::U8> mc,
                                 ffi::ResultBuffer<ffi::F32> ms, ffi::ResultBuffer<ffi::U8> vc,
                                 ffi::ResultBuffer<ffi::F32> vs, float b1, float omb1, float b2,
                                 float omb2, float eps, float eps_root, float top, int64_t block,
                                 int64_t threads, ffi::ThreadPool pool) {
  const int64_t n = p.element_count();
  if (block <= 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "block must be > 0");
  const int64_t nblocks = (n + block - 1) / block;
  if (int64_t(ms->element_count()) != nblocks || int64_t(vs->element_count()) != nblocks ||
      int64_t(mc->element_count()) != n || int64_t(vc->element_count()) != n)
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
  threads = resolve_threads(threads, n, 1 << 16);
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

}  // namespace

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
