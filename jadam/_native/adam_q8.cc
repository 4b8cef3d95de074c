// Adam on one gradient leaf with both moments in blockwise 8 bits (jadam.Quantized), in
// one pass: each block is decoded, updated, re-encoded and turned into the direction
// while it sits in cache. Called by jadam._native.dispatch.adam_leaf.
#include "kernels.h"

namespace {

struct Hyper {
  MomentDecays decays;
  float rbc1, rbc2, eps, eps_root;
};

// One block [lo, hi): the moments, then the direction. `dir` may be `g` itself: a block's
// gradient is read in full before its direction is written.
void block_step(const float* g, uint8_t* mc, float* ms, uint8_t* vc, float* vs, float* dir,
                int64_t b, int64_t lo, int64_t hi, const Hyper& h, float* m, float* v) {
  float* d = dir + lo;
  q8_block_update(g + lo, mc + lo, ms[b], vc + lo, vs[b], hi - lo, h.decays, m, v,
                  [&](int64_t i, float mi, float vi) {
                    d[i] = (mi * h.rbc1) / (std::sqrt(vi * h.rbc2 + h.eps_root) + h.eps);
                  });
}

ffi::Error AdamQ8Impl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> mc_in,
                      ffi::Buffer<ffi::F32> ms_in, ffi::Buffer<ffi::U8> vc_in,
                      ffi::Buffer<ffi::F32> vs_in, ffi::Buffer<ffi::F32> sc,
                      ffi::ResultBuffer<ffi::F32> dir, ffi::ResultBuffer<ffi::U8> mc,
                      ffi::ResultBuffer<ffi::F32> ms, ffi::ResultBuffer<ffi::U8> vc,
                      ffi::ResultBuffer<ffi::F32> vs, float b1, float omb1, float b2, float omb2,
                      float eps_root, float top, int64_t block, int64_t threads,
                      ffi::ThreadPool pool) {
  const int64_t n = g.element_count();
  if (block <= 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "block must be > 0");
  const int64_t nblocks = (n + block - 1) / block;
  if (int64_t(ms->element_count()) != nblocks || int64_t(vs->element_count()) != nblocks ||
      int64_t(mc->element_count()) != n || int64_t(vc->element_count()) != n)
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
  threads = resolve_threads(threads, n, 1 << 16);
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

}  // namespace

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
