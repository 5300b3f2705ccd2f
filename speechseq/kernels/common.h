// Shared by speechseq's CPU kernels (few_row_dot.cc, attend.cc): 16-lane float vectors and work split in chunks
// over XLA's intra-op pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace speechseq {

typedef float v16 __attribute__((vector_size(64), aligned(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

inline v16 broadcast(const float* p) {
#ifdef __AVX512F__
  return (v16)_mm512_set1_ps(*p);  // folds into the multiply-add as an embedded broadcast
#else
  float s = *p;
  return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#endif
}

// Runs fn(c) for every c in [0, chunks): chunks are claimed from a counter by the calling thread and by up to
// (pool threads - 1) pool tasks. A task that starts after every chunk is claimed does nothing, so the caller only
// waits for chunks already being computed (no deadlock when the pool is busy), and fn, called only for claimed
// chunks, may refer to the caller's locals; the shared_ptr keeps the counters alive for such late tasks.
template <class Fn>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t chunks, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks;
    const Fn* fn;
    void run() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        (*fn)(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->fn = &fn;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < threads && t < chunks; ++t) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Runs fn(begin, end) over [0, n) in runs of consecutive items (at least min_run each), about four runs per pool
// thread so that threads that start late still get a share, through parallel_chunks.
template <class Fn>
void parallel_ranges(xla::ffi::ThreadPool& pool, int64_t n, int64_t min_run, const Fn& fn) {
  const int64_t parts = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t step = std::max<int64_t>(min_run, (n + parts - 1) / parts);
  parallel_chunks(pool, (n + step - 1) / step, [&](int64_t c) { fn(c * step, std::min(n, (c + 1) * step)); });
}

}  // namespace speechseq
