// The 1-D concatenation of many buffers of one dtype: a byte copy of each part into place,
// split over threads (jadam.FlatLayout.ravel on the CPU). Called by
// jadam._native.dispatch.concatenate.
#include "kernels.h"

namespace {

struct Part {
  const char* src;
  int64_t off, len;  // bytes, in the output
};

// Copies the parts' bytes that fall in [lo, hi) of the output.
void copy_range(char* out, const std::vector<Part>& parts, int64_t lo, int64_t hi) {
  size_t k = std::upper_bound(parts.begin(), parts.end(), lo,
                              [](int64_t i, const Part& p) { return i < p.off; }) -
             parts.begin() - 1;
  for (; k < parts.size() && parts[k].off < hi; ++k) {
    const Part& p = parts[k];
    int64_t a = std::max(lo, p.off), b = std::min(hi, p.off + p.len);
    if (a < b) std::memcpy(out + a, p.src + (a - p.off), b - a);
  }
}

ffi::Error ConcatImpl(ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out, int64_t threads,
                      ffi::ThreadPool pool) {
  std::vector<Part> parts;
  int64_t off = 0;
  for (size_t k = 0; k < args.size(); ++k) {
    auto b = args.get<ffi::AnyBuffer>(k);
    if (!b.has_value()) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "bad operand");
    if (b->element_type() != out->element_type())
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operand dtypes differ");
    int64_t len = b->size_bytes();
    if (len > 0) parts.push_back({static_cast<const char*>(b->untyped_data()), off, len});
    off += len;
  }
  if (off != int64_t(out->size_bytes()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operand sizes do not add up");
  if (parts.empty()) return ffi::Error::Success();
  char* dst = static_cast<char*>(out->untyped_data());
  threads = resolve_threads(threads, off, 1 << 20);
  // Chunks of 256 KiB handed out dynamically.
  const int64_t chunk = 1 << 18;
  std::atomic<int64_t> next{0};
  run_parallel(threads, pool, [=, &parts, &next] {
    for (int64_t lo = next.fetch_add(chunk); lo < off; lo = next.fetch_add(chunk))
      copy_range(dst, parts, lo, std::min(off, lo + chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Concat, ConcatImpl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
