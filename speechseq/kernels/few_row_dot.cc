// speechseq's CPU kernel for the weight dots of a decode step: y[M, N] = x[M, K] . W[K, N] for a few rows M
// (1-16: batch x beams), W packed in panels of 16 outputs, wp[P, K, 16] with P = ceil(N / 16), zero-padded.
//
// XLA CPU's dots for so few rows reach about half of this machine's memory bandwidth (benchmarks/README.md). Here
// each panel is one contiguous stream, read once, with software prefetch ahead of it, into 16-lane accumulators
// (one per row of x, no horizontal sums), and the panels are shared out over XLA's own intra-op thread pool.
// Built by speechseq/kernels/__init__.py with the system C++ compiler for the machine it runs on (-march=native)
// and called through the XLA FFI (jax.ffi); GCC/Clang vector extensions, so any ISA the compiler targets works.
#include <algorithm>
#include <cstdint>
#include <memory>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using speechseq::broadcast;
using speechseq::v16;
using speechseq::v16u;

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kPrefetchBytes = 4096;  // ahead in the panel stream (measured: 2-8 KB alike, none 25% slower)

// Rows [m0, m0 + MB) of y for the P panels from panel p on. xt is x transposed, [K, M].
template <int MB, int P>
void tile(const float* xt, const float* wp, float* y, int64_t M, int64_t K, int64_t N, int64_t m0, int64_t p) {
  v16 acc[MB][P];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < P; ++j) acc[i][j] = v16{};
  const float* w = wp + p * K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    v16 wv[P];
    for (int j = 0; j < P; ++j) {
      const float* q = w + (j * K + k) * kPanel;
      __builtin_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, 0, 1);
      wv[j] = *reinterpret_cast<const v16*>(q);
    }
    const float* xk = xt + k * M + m0;
    for (int i = 0; i < MB; ++i) {
      v16 xb = broadcast(xk + i);
      for (int j = 0; j < P; ++j) acc[i][j] += xb * wv[j];
    }
  }
  for (int j = 0; j < P; ++j) {
    int64_t n0 = (p + j) * kPanel;
    for (int i = 0; i < MB; ++i) {
      float* out = y + (m0 + i) * N + n0;
      if (n0 + kPanel <= N) {
        *reinterpret_cast<v16u*>(out) = acc[i][j];
      } else {
        for (int64_t n = 0; n < N - n0; ++n) out[n] = acc[i][j][n];
      }
    }
  }
}

// All M rows for P panels from p on: up to 16 accumulators per tile.
template <int P>
void panels(const float* xt, const float* wp, float* y, int64_t M, int64_t K, int64_t N, int64_t p) {
  int64_t m = 0;
  if constexpr (P == 1)
    for (; m + 16 <= M; m += 16) tile<16, 1>(xt, wp, y, M, K, N, m, p);
  if constexpr (P <= 2)
    for (; m + 8 <= M; m += 8) tile<8, P>(xt, wp, y, M, K, N, m, p);
  for (; m + 4 <= M; m += 4) tile<4, P>(xt, wp, y, M, K, N, m, p);
  switch (M - m) {
    case 3: tile<3, P>(xt, wp, y, M, K, N, m, p); break;
    case 2: tile<2, P>(xt, wp, y, M, K, N, m, p); break;
    case 1: tile<1, P>(xt, wp, y, M, K, N, m, p); break;
  }
}

void panel_range(const float* xt, const float* wp, float* y, int64_t M, int64_t K, int64_t N, int64_t p0,
                 int64_t p1) {
  int64_t p = p0;
  if (M <= 4) {
    for (; p + 4 <= p1; p += 4) panels<4>(xt, wp, y, M, K, N, p);
  } else if (M <= 8) {
    for (; p + 2 <= p1; p += 2) panels<2>(xt, wp, y, M, K, N, p);
  }
  for (; p < p1; ++p) panels<1>(xt, wp, y, M, K, N, p);
}

ffi::Error FewRowDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto wd = wp.dimensions();
  if (wd.size() != 3 || wd[2] != kPanel) return ffi::Error::InvalidArgument("wp: expected [panels, K, 16]");
  const int64_t K = wd[1], P = wd[0];
  if (K == 0 || x.element_count() % K) return ffi::Error::InvalidArgument("x: last axis differs from wp's K");
  const int64_t M = x.element_count() / K;
  if (M == 0) return ffi::Error::Success();
  const int64_t N = y->element_count() / M;
  if (N > P * kPanel) return ffi::Error::InvalidArgument("y: more outputs than wp's panels hold");

  std::unique_ptr<float[]> xt(new float[K * M]);
  const float* xs = x.typed_data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * M + m] = xs[m * K + k];
  const float* w = wp.typed_data();
  float* out = y->typed_data();
  speechseq::parallel_ranges(pool, P, 4, [&](int64_t p0, int64_t p1) {
    panel_range(xt.get(), w, out, M, K, N, p0, p1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpeechseqFewRowDot, FewRowDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
