// speechseq's CPU kernel for a decode step's attention: a few query rows per (batch, head) against keys stored
// transposed, k [H, S], and values v [S, H] (the decode-step layout of the self-attention cache and of the
// cross-attention K/V, speechseq/decoders/transformer.py), one (batch, head) per task on XLA's intra-op pool.
//
// XLA CPU runs these as batched dots of 1-16 rows that read K and V at a third to a half of the machine's memory
// bandwidth (benchmarks/README.md); here each (batch, head) reads its K rows and V rows once, front to back.
// Numbers as speechseq.layers.core.attention computes them: scores = (q . k) * scale, masked scores set to the
// lowest float32, softmax as exp(x - max) / sum (a fully masked row is uniform), then probs . v, all in float32.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using speechseq::broadcast;
using speechseq::v16;
using speechseq::v16u;

namespace {

typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

inline v16 splat(float s) { return v16{} + s; }

// 16 mask bytes (0 or not) as 16 int32 lanes.
inline v16i widen(const uint8_t* m) {
#ifdef __AVX512F__
  return (v16i)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
#else
  v16b b;
  std::memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, v16i);
#endif
}

// e^x for 16 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial; within 2 ulp), 0 below the
// smallest normal result, as for the -inf and lowest-float32 scores of masked and padded keys.
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.33654f);
  v16 xc = x < splat(-88.3762626647949f) ? splat(-88.3762626647949f) : x;
  xc = xc > splat(88.3762626647950f) ? splat(88.3762626647950f) : xc;
  v16 n = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest: 1.5 * 2^23
  n = n - 12582912.0f;
  v16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v16 y = splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + r + 1.0f;
  v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  y = y * (v16)bits;
  return x < lo ? splat(0.0f) : y;
}

// sc[i0 + i, s] += sum over h in [h, h + HB) of q[i0 + i, h] k[h, s], for i < QB and s < Sp (k's rows beyond S
// read as 0); q's values held in registers across the row.
template <int HB, int QB>
void score_rows(const float* __restrict__ q, const float* __restrict__ k, float* __restrict__ sc, int64_t H,
                int64_t S, int64_t Sp, int64_t h, int64_t i0, const float* prefetch) {
  v16 qb[QB][HB];
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < HB; ++j) qb[i][j] = broadcast(q + (i0 + i) * H + h + j);
  const int64_t S16 = S / kLanes * kLanes;
  for (int64_t s0 = 0; s0 < Sp; s0 += kLanes) {
    v16 kv[HB];
    for (int j = 0; j < HB; ++j) {
      const float* row = k + (h + j) * S + s0;
      if (prefetch) __builtin_prefetch(prefetch + (h + j) * S + s0, 0, 2);
      if (s0 < S16) {
        kv[j] = *reinterpret_cast<const v16u*>(row);
      } else {
        kv[j] = v16{};
        for (int64_t s = 0; s < S - s0; ++s) kv[j][s] = row[s];
      }
    }
    for (int i = 0; i < QB; ++i) {
      v16* a = reinterpret_cast<v16*>(sc + (i0 + i) * Sp + s0);
      v16 acc = *a;
      for (int j = 0; j < HB; ++j) acc += qb[i][j] * kv[j];
      *a = acc;
    }
  }
}

template <int HB>
void score_rows_qb(int64_t qb, const float* q, const float* k, float* sc, int64_t H, int64_t S, int64_t Sp,
                   int64_t h, int64_t i0, const float* prefetch) {
  switch (qb) {
    case 1: score_rows<HB, 1>(q, k, sc, H, S, Sp, h, i0, prefetch); break;
    case 2: score_rows<HB, 2>(q, k, sc, H, S, Sp, h, i0, prefetch); break;
    case 3: score_rows<HB, 3>(q, k, sc, H, S, Sp, h, i0, prefetch); break;
    default: score_rows<HB, 4>(q, k, sc, H, S, Sp, h, i0, prefetch); break;
  }
}

// out[i0 + i, h0 + 16 j] for i < QB, j < NV: sum over s < S of p[i0 + i, s] v[s, h0 + 16 j ...].
template <int QB, int NV>
void weighted_values(const float* p, int64_t Sp, const float* v, int64_t S, int64_t H, float* out, int64_t i0,
                     int64_t h0, const float* next_k) {
  v16 acc[QB][NV];
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = v16{};
  for (int64_t s = 0; s < S; ++s) {
    if (next_k)  // as many values as v: the next (batch, head)'s keys arrive while this one computes
      for (int64_t l = 0; l < H; l += kLanes) __builtin_prefetch(next_k + s * H + l, 0, 2);
    v16 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = *reinterpret_cast<const v16u*>(v + s * H + h0 + j * kLanes);
    for (int i = 0; i < QB; ++i) {
      v16 pb = broadcast(p + (i0 + i) * Sp + s);
      for (int j = 0; j < NV; ++j) acc[i][j] += pb * vv[j];
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < NV; ++j) *reinterpret_cast<v16u*>(out + (i0 + i) * H + h0 + j * kLanes) = acc[i][j];
}

template <int QB>
void weighted_values_nv(int nv, const float* p, int64_t Sp, const float* v, int64_t S, int64_t H, float* out,
                        int64_t i0, int64_t h0, const float* next_k) {
  switch (nv) {
    case 1: weighted_values<QB, 1>(p, Sp, v, S, H, out, i0, h0, next_k); break;
    case 2: weighted_values<QB, 2>(p, Sp, v, S, H, out, i0, h0, next_k); break;
    case 3: weighted_values<QB, 3>(p, Sp, v, S, H, out, i0, h0, next_k); break;
    default: weighted_values<QB, 4>(p, Sp, v, S, H, out, i0, h0, next_k); break;
  }
}

// One (batch, head): q [Q, H], k [H, S], v [S, H], mask rows m (row i at m + i * mask_row, 0: shared) -> out [Q, H].
// next_k: the keys of the (batch, head) this thread does next, if known, prefetched while the values are read
// (measured alone, 4 query rows from memory: 12-14.5 us per (batch, head) against 17-18 without).
void attend_one(const float* q, const float* k, const float* v, const uint8_t* m, int64_t mask_row, float scale,
                float* out, int64_t Q, int64_t H, int64_t S, std::vector<v16>& buf, const float* next_k) {
  const int64_t Sp = (S + kLanes - 1) / kLanes * kLanes;
  buf.assign(Q * Sp / kLanes, v16{});
  float* sc = reinterpret_cast<float*>(buf.data());
  for (int64_t h = 0; h < H; h += 4)
    for (int64_t i0 = 0; i0 < Q; i0 += 4) {
      const float* prefetch = i0 == 0 ? v : nullptr;  // v (as many values as k) on its way while k is read
      if (h + 4 <= H) {
        score_rows_qb<4>(Q - i0, q, k, sc, H, S, Sp, h, i0, prefetch);
      } else {
        for (int64_t hh = h; hh < H; ++hh) score_rows_qb<1>(Q - i0, q, k, sc, H, S, Sp, hh, i0, prefetch);
      }
    }
  for (int64_t i = 0; i < Q; ++i) {
    float* r = sc + i * Sp;
    const uint8_t* mi = m + i * mask_row;
    // masked keys to the lowest float32, the rest scaled, and the row's maximum: 16 keys at a time
    const v16 lowest = splat(-FLT_MAX);
    v16 vmx = lowest;
    int64_t s = 0;
    for (; s + kLanes <= S; s += kLanes) {
      v16* x = reinterpret_cast<v16*>(r + s);
      const v16 val = widen(mi + s) != 0 ? *x * scale : lowest;
      *x = val;
      vmx = vmx > val ? vmx : val;
    }
    float mx = -FLT_MAX;
    for (int64_t l = 0; l < kLanes; ++l) mx = std::max(mx, vmx[l]);
    for (; s < S; ++s) {
      r[s] = mi[s] ? r[s] * scale : -FLT_MAX;
      mx = std::max(mx, r[s]);
    }
    for (int64_t s = S; s < Sp; ++s) r[s] = -INFINITY;
    v16 sum = v16{};
    for (int64_t s0 = 0; s0 < Sp; s0 += kLanes) {
      v16* x = reinterpret_cast<v16*>(r + s0);
      *x = vexp(*x - mx);
      sum += *x;
    }
    float total = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) total += sum[l];
    for (int64_t s0 = 0; s0 < Sp; s0 += kLanes) {
      v16* x = reinterpret_cast<v16*>(r + s0);
      *x = *x / total;
    }
  }
  const int64_t Hv = H / kLanes * kLanes;
  for (int64_t i0 = 0; i0 < Q; i0 += 4) {
    const int64_t qb = std::min<int64_t>(4, Q - i0);
    for (int64_t h0 = 0; h0 < Hv; h0 += 4 * kLanes) {
      const float* pf = i0 == 0 && h0 == 0 ? next_k : nullptr;
      const int nv = static_cast<int>(std::min<int64_t>(4, (Hv - h0) / kLanes));
      switch (qb) {
        case 1: weighted_values_nv<1>(nv, sc, Sp, v, S, H, out, i0, h0, pf); break;
        case 2: weighted_values_nv<2>(nv, sc, Sp, v, S, H, out, i0, h0, pf); break;
        case 3: weighted_values_nv<3>(nv, sc, Sp, v, S, H, out, i0, h0, pf); break;
        default: weighted_values_nv<4>(nv, sc, Sp, v, S, H, out, i0, h0, pf); break;
      }
    }
    for (int64_t hh = Hv; hh < H; ++hh)
      for (int64_t i = i0; i < i0 + qb; ++i) {
        float acc = 0.0f;
        for (int64_t s = 0; s < S; ++s) acc += sc[i * Sp + s] * v[s * H + hh];
        out[i * H + hh] = acc;
      }
  }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3)
    return ffi::Error::InvalidArgument("q, k, v, mask: expected [rows, Q, H], [rows, H, S], [rows, S, H], [B, Q, S]");
  const int64_t R = qd[0], Q = qd[1], H = qd[2], S = kd[2];
  if (kd[0] != R || kd[1] != H || vd[0] != R || vd[1] != S || vd[2] != H)
    return ffi::Error::InvalidArgument("k, v: shapes do not match q [rows, Q, H] and each other");
  if (md[2] != S || (md[1] != 1 && md[1] != Q) || md[0] == 0 || R % md[0])
    return ffi::Error::InvalidArgument("mask: expected [1 or batch, 1 or Q, S]");
  if (scale.element_count() != 1) return ffi::Error::InvalidArgument("scale: expected one value");
  if (R == 0 || Q == 0 || H == 0) return ffi::Error::Success();
  const int64_t per_mask = R / md[0], mask_row = md[1] == 1 ? 0 : S;
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const uint8_t* ms = mask.typed_data();
  const float sc = scale.typed_data()[0];
  float* os = out->typed_data();
  speechseq::parallel_ranges(pool, R, 1, [&](int64_t r0, int64_t r1) {  // runs of (batch, head)s, in order
    thread_local std::vector<v16> buf;
    for (int64_t r = r0; r < r1; ++r)
      attend_one(qs + r * Q * H, ks + r * H * S, vs + r * S * H, ms + (r / per_mask) * md[1] * S, mask_row, sc,
                 os + r * Q * H, Q, H, S, buf, r + 1 < r1 ? ks + (r + 1) * H * S : nullptr);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpeechseqAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
