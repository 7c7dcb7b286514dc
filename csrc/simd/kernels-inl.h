// Distance kernels, written once and compiled once per instruction-set level.
//
// Each kernels_<level>.cc defines PYKNN_KNS (a namespace unique to the level), PYKNN_VW (floats per
// vector register), PYKNN_MR (queries per GEMM register tile), PYKNN_LEVEL_NAME and PYKNN_GETTER,
// then includes this file. GCC/Clang vector extensions lower to the level's registers (SSE/NEON
// for the portable build, YMM for AVX2, ZMM for AVX-512).
//
// Nothing here may use std:: templates or other inline code shared with the rest of the program:
// those would be emitted with this level's instructions as COMDAT symbols, and the linker could
// hand the AVX-512 copy to baseline code on a CPU without AVX-512.
#include "simd/dispatch.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pyknn {
namespace simd {
namespace PYKNN_KNS {
namespace {

constexpr int W = PYKNN_VW;
constexpr int NR = 2 * W;  // one packed panel = two vector registers wide
constexpr int MR = PYKNN_MR;

typedef float V __attribute__((vector_size(W * sizeof(float))));

inline V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
inline void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
inline V zero() { return V{}; }

inline float hsum(V v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

float dot(const float* a, const float* b, size_t d) {
  V acc0 = zero(), acc1 = zero();
  size_t k = 0;
  for (; k + 2 * W <= d; k += 2 * W) {
    acc0 += load(a + k) * load(b + k);
    acc1 += load(a + k + W) * load(b + k + W);
  }
  if (k + W <= d) {
    acc0 += load(a + k) * load(b + k);
    k += W;
  }
  float s = hsum(acc0 + acc1);
  for (; k < d; ++k) s += a[k] * b[k];
  return s;
}

float l2sq(const float* a, const float* b, size_t d) {
  V acc0 = zero(), acc1 = zero();
  size_t k = 0;
  for (; k + 2 * W <= d; k += 2 * W) {
    V t0 = load(a + k) - load(b + k);
    V t1 = load(a + k + W) - load(b + k + W);
    acc0 += t0 * t0;
    acc1 += t1 * t1;
  }
  if (k + W <= d) {
    V t = load(a + k) - load(b + k);
    acc0 += t * t;
    k += W;
  }
  float s = hsum(acc0 + acc1);
  for (; k < d; ++k) {
    float t = a[k] - b[k];
    s += t * t;
  }
  return s;
}

// One query against n rows. Rows read from memory are streamed one after the other: on the AMD
// EPYC hosts four interleaved row streams ran at half the bandwidth of one (one thread, 176 KB
// lists of 384-d rows: 11 against 22 GB/s). Small calls (a few rows already in cache, as in
// HNSW neighbour selection) instead take four rows at a time and load the query once per four
// products. Both paths add in dot's / l2sq's order (two accumulators, then the tail), so a
// row's score does not depend on the path or on its position in the call.
constexpr size_t kStreamFloats = 4096;  // 16 KB: a call this large is not expected in L1

// One dimension's contribution, for a vector register or a float.
template <bool L2, class T>
inline T term(T a, T b) {
  if (L2) {
    const T t = a - b;
    return t * t;
  }
  return a * b;
}

template <bool L2>
void many(const float* q, const float* x, size_t n, size_t d, float* out) {
  if (n * d >= kStreamFloats) {
    for (size_t i = 0; i < n; ++i) out[i] = L2 ? l2sq(q, x + i * d, d) : dot(q, x + i * d, d);
    return;
  }
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* r[4] = {x + i * d, x + (i + 1) * d, x + (i + 2) * d, x + (i + 3) * d};
    V a0[4] = {zero(), zero(), zero(), zero()}, a1[4] = {zero(), zero(), zero(), zero()};
    size_t k = 0;
    for (; k + 2 * W <= d; k += 2 * W) {
      const V q0 = load(q + k), q1 = load(q + k + W);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        a0[j] += term<L2>(q0, load(r[j] + k));
        a1[j] += term<L2>(q1, load(r[j] + k + W));
      }
    }
    if (k + W <= d) {
      const V q0 = load(q + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) a0[j] += term<L2>(q0, load(r[j] + k));
      k += W;
    }
    float s[4];
    for (int j = 0; j < 4; ++j) s[j] = hsum(a0[j] + a1[j]);
    // Row by row, as in dot(): vectorised across the rows, the tail would round differently.
    for (int j = 0; j < 4; ++j)
      for (size_t t = k; t < d; ++t) s[j] += term<L2>(q[t], r[j][t]);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) out[i + j] = s[j];
  }
  for (; i < n; ++i) out[i] = L2 ? l2sq(q, x + i * d, d) : dot(q, x + i * d, d);
}

// A row's vector register and element as float32, from float32 or half-precision rows.
inline V load_row(const float* p) { return load(p); }
inline float elem(float v) { return v; }
#if defined(__F16C__)
inline V load_h(const uint16_t* p);
inline V load_row(const uint16_t* p) { return load_h(p); }
inline float elem(uint16_t v) { return _cvtsh_ss(v); }
#endif

// One query against n rows picked by index (rows base + idx[i] * d), four rows at a time with two
// accumulators each: eight independent FMA chains hide the FMA latency that a row-by-row loop
// (two chains) waits on, and the graph search gets all of a node's neighbours in one call.
// A last group of fewer than four rows repeats its last row (already in cache) instead of
// falling back to the two-chain single-row kernel. Rows are float32 or (graph construction, see
// load_h) half-precision bit patterns.
template <bool L2, class T>
void gather(const float* q, const T* base, const uint32_t* idx, size_t n, size_t d, float* out) {
  float tail[4];
  for (size_t i = 0; i < n; i += 4) {
    const size_t rows = n - i < 4 ? n - i : 4;
    float* o = rows == 4 ? out + i : tail;
    const T* x[4];
    for (size_t r = 0; r < 4; ++r)
      x[r] = base + static_cast<size_t>(idx[i + (r < rows ? r : rows - 1)]) * d;
    V a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = zero();
    size_t k = 0;
    for (; k + 2 * W <= d; k += 2 * W) {
      const V q0 = load(q + k), q1 = load(q + k + W);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        if (L2) {
          const V t0 = q0 - load_row(x[r] + k), t1 = q1 - load_row(x[r] + k + W);
          a[r][0] += t0 * t0;
          a[r][1] += t1 * t1;
        } else {
          a[r][0] += q0 * load_row(x[r] + k);
          a[r][1] += q1 * load_row(x[r] + k + W);
        }
      }
    }
    if (k + W <= d) {
      const V q0 = load(q + k);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        if (L2) {
          const V t0 = q0 - load_row(x[r] + k);
          a[r][0] += t0 * t0;
        } else {
          a[r][0] += q0 * load_row(x[r] + k);
        }
      }
      k += W;
    }
    for (int r = 0; r < 4; ++r) {
      float s = hsum(a[r][0] + a[r][1]);
      for (size_t j = k; j < d; ++j) {
        const float v = elem(x[r][j]);
        if (L2) {
          const float t = q[j] - v;
          s += t * t;
        } else {
          s += q[j] * v;
        }
      }
      o[r] = s;
    }
    if (rows < 4)
      for (size_t r = 0; r < rows; ++r) out[i + r] = tail[r];
  }
}

// P points at a time share each load of a centroid block; D is a compile-time dimension so
// that the loop over it unrolls.
template <int D, int P, bool IP>
inline void nearest_p(const float* x, const float* ct, const float* init, size_t kp,
                      int64_t* labels, float* best) {
  typedef int32_t IV __attribute__((vector_size(W * sizeof(int32_t))));
  IV lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  V bv[P];
  IV bi[P];
  for (int p = 0; p < P; ++p) {
    bv[p] = zero() + (IP ? -__builtin_inff() : __builtin_inff());
    bi[p] = lane;
  }
  for (size_t c0 = 0; c0 < kp; c0 += W) {
    V a[P];
    const V a0 = load(init + c0);
    for (int p = 0; p < P; ++p) a[p] = a0;
#pragma GCC unroll 16
    for (int j = 0; j < D; ++j) {
      const V c = load(ct + j * kp + c0);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        if (IP) {
          a[p] += x[p * D + j] * c;
        } else {
          const V t = x[p * D + j] - c;
          a[p] += t * t;
        }
      }
    }
    const IV lc = lane + static_cast<int32_t>(c0);
    for (int p = 0; p < P; ++p) {
      const IV better = IP ? a[p] > bv[p] : a[p] < bv[p];
      bv[p] = better ? a[p] : bv[p];
      bi[p] = better ? lc : bi[p];
    }
  }
  for (int p = 0; p < P; ++p) {
    float b = bv[p][0];
    int32_t bidx = bi[p][0];
    for (int l = 1; l < W; ++l) {
      const float v = bv[p][l];
      const bool take = (IP ? v > b : v < b) || (v == b && bi[p][l] < bidx);
      if (take) {
        b = v;
        bidx = bi[p][l];
      }
    }
    labels[p] = bidx;
    best[p] = b;
  }
}

template <int D, bool IP>
void nearest_d(const float* x, size_t n, const float* ct, const float* init, size_t kp,
               int64_t* labels, float* best) {
  size_t i = 0;
  for (; i + 4 <= n; i += 4) nearest_p<D, 4, IP>(x + i * D, ct, init, kp, labels + i, best + i);
  for (; i < n; ++i) nearest_p<D, 1, IP>(x + i * D, ct, init, kp, labels + i, best + i);
}

template <int D>
void nearest_ip(const float* x, size_t n, const float* ct, const float* init, size_t kp, bool ip,
                int64_t* labels, float* best) {
  if (ip) nearest_d<D, true>(x, n, ct, init, kp, labels, best);
  else nearest_d<D, false>(x, n, ct, init, kp, labels, best);
}

// Nearest centroid of each of n points of small dimension d (1..16: product-quantizer
// sub-spaces, k-means on them), computed directly rather than through the matrix product: at
// such d the product's packing and the screening of the expanded L2 form cost more than the
// arithmetic. ct holds the centroids dimension-major (d rows of kp floats, kp a multiple of W);
// init holds kp starting scores (0 for real centroids, +inf (L2) or -inf (ip) for padding).
// Scores are ||x - c||^2 (smallest wins) or <x, c> (largest wins); ties go to the smaller index.
void nearest_small(const float* x, size_t n, size_t d, const float* ct, const float* init,
                   size_t kp, bool ip, int64_t* labels, float* best) {
  switch (d) {
#define PYKNN_NEAREST_CASE(D) \
  case D: nearest_ip<D>(x, n, ct, init, kp, ip, labels, best); break;
    PYKNN_NEAREST_CASE(1) PYKNN_NEAREST_CASE(2) PYKNN_NEAREST_CASE(3) PYKNN_NEAREST_CASE(4)
    PYKNN_NEAREST_CASE(5) PYKNN_NEAREST_CASE(6) PYKNN_NEAREST_CASE(7) PYKNN_NEAREST_CASE(8)
    PYKNN_NEAREST_CASE(9) PYKNN_NEAREST_CASE(10) PYKNN_NEAREST_CASE(11) PYKNN_NEAREST_CASE(12)
    PYKNN_NEAREST_CASE(13) PYKNN_NEAREST_CASE(14) PYKNN_NEAREST_CASE(15) PYKNN_NEAREST_CASE(16)
#undef PYKNN_NEAREST_CASE
    default: break;  // callers use the matrix product beyond 16
  }
}

#if defined(__F16C__)
// Half-precision rows (graph construction reads them: half the bytes of a float32 row, and
// construction is bound by fetching rows from memory). The query stays float32.
inline V load_h(const uint16_t* p) {
#if PYKNN_VW == 16
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  V r;
  __builtin_memcpy(&r, &v, sizeof(V));
  return r;
}

void dot_gather_h(const float* q, const uint16_t* base, const uint32_t* idx, size_t n, size_t d,
                  float* out) {
  gather<false>(q, base, idx, n, d, out);
}
void l2sq_gather_h(const float* q, const uint16_t* base, const uint32_t* idx, size_t n,
                   size_t d, float* out) {
  gather<true>(q, base, idx, n, d, out);
}

// Rounds n floats to half precision (nearest even; beyond the half range: +-inf); returns the
// largest magnitude of the float32 input.
float to_half(const float* x, size_t n, uint16_t* out) {
  V m = zero();
  size_t i = 0;
  for (; i + W <= n; i += W) {
    const V v = load(x + i);
    const V a = v < zero() ? -v : v;
    m = a > m ? a : m;
#if PYKNN_VW == 16
    __m512 t;
    __builtin_memcpy(&t, &v, sizeof(V));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    __m256 t;
    __builtin_memcpy(&t, &v, sizeof(V));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  }
  float mx = 0.f;
  for (int j = 0; j < W; ++j) mx = m[j] > mx ? m[j] : mx;
  for (; i < n; ++i) {
    out[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const float a = x[i] < 0.f ? -x[i] : x[i];
    mx = a > mx ? a : mx;
  }
  return mx;
}
// out[i] = x[i] widened to float32.
void from_half(const uint16_t* x, size_t n, float* out) {
  size_t i = 0;
  for (; i + W <= n; i += W) store(out + i, load_h(x + i));
  for (; i < n; ++i) out[i] = _cvtsh_ss(x[i]);
}
#define PYKNN_HALF_KERNELS dot_gather_h, l2sq_gather_h, to_half, from_half
#else
// Without F16C (the portable level) construction reads the float32 rows.
#define PYKNN_HALF_KERNELS nullptr, nullptr, nullptr, nullptr
#endif

void dot_gather(const float* q, const float* base, const uint32_t* idx, size_t n, size_t d,
                float* out) {
  gather<false>(q, base, idx, n, d, out);
}
void l2sq_gather(const float* q, const float* base, const uint32_t* idx, size_t n, size_t d,
                 float* out) {
  gather<true>(q, base, idx, n, d, out);
}

void dot_many(const float* q, const float* x, size_t n, size_t d, float* out) {
  many<false>(q, x, n, d, out);
}
void l2sq_many(const float* q, const float* x, size_t n, size_t d, float* out) {
  many<true>(q, x, n, d, out);
}

void norms_sq(const float* x, size_t n, size_t d, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = dot(x + i * d, x + i * d, d);
}

void pack(const float* x, size_t nb, size_t d, float* packed) {
  for (size_t p0 = 0; p0 < nb; p0 += NR) {
    float* panel = packed + p0 * d;
    const size_t rows = nb - p0 < static_cast<size_t>(NR) ? nb - p0 : NR;
    const float* src = x + p0 * d;
    if (rows == static_cast<size_t>(NR)) {
      // Writes in order; the NR source rows' current cache lines stay in L1 across k.
      for (size_t k = 0; k < d; ++k) {
        float* out = panel + k * NR;
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) out[j] = src[j * d + k];
      }
    } else {
      for (size_t k = 0; k < d; ++k) {
        float* out = panel + k * NR;
        for (size_t j = 0; j < rows; ++j) out[j] = src[j * d + k];
        for (size_t j = rows; j < static_cast<size_t>(NR); ++j) out[j] = 0.f;
      }
    }
  }
}

// M queries x one panel of NR vectors, accumulated over all d dimensions in registers:
// per dimension, two panel loads and M broadcasts feed 2*M FMAs.
template <int M>
inline void micro(const float* q, size_t ldq, const float* panel, size_t d, float* out,
                  size_t ldo) {
  V acc[M][2];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = zero();
  for (size_t k = 0; k < d; ++k) {
    const V b0 = load(panel + k * NR);
    const V b1 = load(panel + k * NR + W);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const float a = q[i * ldq + k];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    store(out + i * ldo, acc[i][0]);
    store(out + i * ldo + W, acc[i][1]);
  }
}

template <int M>
void micro_rows(const float* q, size_t ldq, const float* packed, size_t npanels, size_t d,
                float* out, size_t ldo) {
  for (size_t p = 0; p < npanels; ++p)
    micro<M>(q, ldq, packed + p * NR * d, d, out + p * NR, ldo);
}

template <int M>
void tail_rows(int m, const float* q, size_t ldq, const float* packed, size_t npanels, size_t d,
               float* out, size_t ldo) {
  if constexpr (M > 0) {
    if (m == M) return micro_rows<M>(q, ldq, packed, npanels, d, out, ldo);
    tail_rows<M - 1>(m, q, ldq, packed, npanels, d, out, ldo);
  }
}

void gemm(const float* q, size_t ldq, size_t mq, const float* packed, size_t nb, size_t d,
          float* out, size_t ldo) {
  const size_t npanels = (nb + NR - 1) / NR;
  size_t i = 0;
  for (; i + MR <= mq; i += MR) micro_rows<MR>(q + i * ldq, ldq, packed, npanels, d, out + i * ldo, ldo);
  if (i < mq)
    tail_rows<MR - 1>(static_cast<int>(mq - i), q + i * ldq, ldq, packed, npanels, d,
                      out + i * ldo, ldo);
}

inline V vmax(V a, V b) { return a > b ? a : b; }

// Positions of the scores >= thr, ascending. Most blocks hold no candidate once the heaps are
// full, so the test is done on the maximum of 4 registers first.
size_t select_ge(const float* s, size_t n, float thr, uint32_t* idx) {
  size_t c = 0, j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    V m = vmax(vmax(load(s + j), load(s + j + W)), vmax(load(s + j + 2 * W), load(s + j + 3 * W)));
    float mx = m[0];
    for (int i = 1; i < W; ++i) mx = m[i] > mx ? m[i] : mx;
    if (!(mx >= thr)) continue;
    for (size_t i = j; i < j + 4 * W; ++i)
      if (s[i] >= thr) idx[c++] = static_cast<uint32_t>(i);
  }
  for (; j < n; ++j)
    if (s[j] >= thr) idx[c++] = static_cast<uint32_t>(j);
  return c;
}

float max_of(const float* s, size_t n) {
  size_t j = 0;
  float mx = -__builtin_inff();
  if (n >= static_cast<size_t>(W)) {
    V m = load(s);
    for (j = W; j + W <= n; j += W) m = vmax(m, load(s + j));
    for (int i = 0; i < W; ++i) mx = m[i] > mx ? m[i] : mx;
  }
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// Four codes at a time: the 4 x M table look-ups are independent, so loads overlap.
void pq8_scan(const float* lut, const uint8_t* codes, size_t n, size_t M, float bias, float* out) {
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint8_t* c0 = codes + i * M;
    const uint8_t* c1 = c0 + M;
    const uint8_t* c2 = c1 + M;
    const uint8_t* c3 = c2 + M;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (size_t m = 0; m < M; ++m) {
      const float* t = lut + m * 256;
      s0 += t[c0[m]];
      s1 += t[c1[m]];
      s2 += t[c2[m]];
      s3 += t[c3[m]];
    }
    out[i] = bias + s0;
    out[i + 1] = bias + s1;
    out[i + 2] = bias + s2;
    out[i + 3] = bias + s3;
  }
  for (; i < n; ++i) {
    const uint8_t* c = codes + i * M;
    float s = 0.f;
    for (size_t m = 0; m < M; ++m) s += lut[m * 256 + c[m]];
    out[i] = bias + s;
  }
}

// The 4-bit look-ups are byte shuffles (pshufb): 16 table entries in each 128-bit lane, indexed
// by the 16 nibbles of that lane. Sums are kept in uint16 lanes: `acc` adds whole shuffled
// 16-bit words (even vector + 256 * odd vector, modulo 2^16) and `odd` the odd vectors alone, so
// the even sums are acc - 256 * odd at the end.
#if defined(__AVX512BW__)
void pq4_scan(const uint8_t* codes, size_t nblocks, size_t M, const uint8_t* lut, uint16_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (size_t b = 0; b < nblocks; ++b) {
    const uint8_t* cb = codes + b * M * 16;
    __m512i acc_lo = _mm512_setzero_si512(), odd_lo = acc_lo, acc_hi = acc_lo, odd_hi = acc_lo;
    size_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const __m512i c = _mm512_loadu_si512(cb + m * 16);
      const __m512i t = _mm512_loadu_si512(lut + m * 16);
      const __m512i rlo = _mm512_shuffle_epi8(t, _mm512_and_si512(c, low4));
      const __m512i rhi = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), low4));
      acc_lo = _mm512_add_epi16(acc_lo, rlo);
      odd_lo = _mm512_add_epi16(odd_lo, _mm512_srli_epi16(rlo, 8));
      acc_hi = _mm512_add_epi16(acc_hi, rhi);
      odd_hi = _mm512_add_epi16(odd_hi, _mm512_srli_epi16(rhi, 8));
    }
    if (m < M) {  // two sub-quantizers left: the upper half of the registers stays zero
      const __mmask64 half = 0xffffffffull;
      const __m512i c = _mm512_maskz_loadu_epi8(half, cb + m * 16);
      const __m512i t = _mm512_maskz_loadu_epi8(half, lut + m * 16);
      const __m512i rlo = _mm512_shuffle_epi8(t, _mm512_and_si512(c, low4));
      const __m512i rhi = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), low4));
      acc_lo = _mm512_add_epi16(acc_lo, rlo);
      odd_lo = _mm512_add_epi16(odd_lo, _mm512_srli_epi16(rlo, 8));
      acc_hi = _mm512_add_epi16(acc_hi, rhi);
      odd_hi = _mm512_add_epi16(odd_hi, _mm512_srli_epi16(rhi, 8));
    }
    // Fold the four 128-bit lanes (each holds the same 16 vectors for another sub-quantizer).
    auto fold = [](__m512i v) {
      const __m256i h = _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
      return _mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    };
    const __m128i alo = fold(acc_lo), olo = fold(odd_lo), ahi = fold(acc_hi), ohi = fold(odd_hi);
    const __m128i elo = _mm_sub_epi16(alo, _mm_slli_epi16(olo, 8));
    const __m128i ehi = _mm_sub_epi16(ahi, _mm_slli_epi16(ohi, 8));
    uint16_t* o = out + b * 32;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(elo, olo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), _mm_unpackhi_epi16(elo, olo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpacklo_epi16(ehi, ohi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 24), _mm_unpackhi_epi16(ehi, ohi));
  }
}
#elif defined(__AVX2__)
void pq4_scan(const uint8_t* codes, size_t nblocks, size_t M, const uint8_t* lut, uint16_t* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (size_t b = 0; b < nblocks; ++b) {
    const uint8_t* cb = codes + b * M * 16;
    __m256i acc_lo = _mm256_setzero_si256(), odd_lo = acc_lo, acc_hi = acc_lo, odd_hi = acc_lo;
    for (size_t m = 0; m < M; m += 2) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + m * 16));
      const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + m * 16));
      const __m256i rlo = _mm256_shuffle_epi8(t, _mm256_and_si256(c, low4));
      const __m256i rhi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
      acc_lo = _mm256_add_epi16(acc_lo, rlo);
      odd_lo = _mm256_add_epi16(odd_lo, _mm256_srli_epi16(rlo, 8));
      acc_hi = _mm256_add_epi16(acc_hi, rhi);
      odd_hi = _mm256_add_epi16(odd_hi, _mm256_srli_epi16(rhi, 8));
    }
    auto fold = [](__m256i v) {
      return _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    };
    const __m128i alo = fold(acc_lo), olo = fold(odd_lo), ahi = fold(acc_hi), ohi = fold(odd_hi);
    const __m128i elo = _mm_sub_epi16(alo, _mm_slli_epi16(olo, 8));
    const __m128i ehi = _mm_sub_epi16(ahi, _mm_slli_epi16(ohi, 8));
    uint16_t* o = out + b * 32;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(elo, olo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), _mm_unpackhi_epi16(elo, olo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpacklo_epi16(ehi, ohi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 24), _mm_unpackhi_epi16(ehi, ohi));
  }
}
#else
void pq4_scan(const uint8_t* codes, size_t nblocks, size_t M, const uint8_t* lut, uint16_t* out) {
  for (size_t b = 0; b < nblocks; ++b) {
    const uint8_t* cb = codes + b * M * 16;
    uint16_t acc[32] = {};
    for (size_t m = 0; m < M; ++m) {
      const uint8_t* t = lut + m * 16;
      const uint8_t* c = cb + m * 16;
      for (int j = 0; j < 16; ++j) {
        acc[j] = static_cast<uint16_t>(acc[j] + t[c[j] & 15]);
        acc[j + 16] = static_cast<uint16_t>(acc[j + 16] + t[c[j] >> 4]);
      }
    }
    for (int j = 0; j < 32; ++j) out[b * 32 + j] = acc[j];
  }
}
#endif

// Most 32-vector blocks of a long scan hold no candidate: one compare per block, positions only
// for the rare hits.
#if defined(__AVX512BW__)
size_t select_ge_u16(const uint16_t* s, size_t n, uint32_t thr, uint32_t* idx) {
  if (thr > 0xffff) return 0;
  const __m512i t = _mm512_set1_epi16(static_cast<short>(thr));
  size_t c = 0, j = 0;
  for (; j + 32 <= n; j += 32) {
    uint32_t m = _mm512_cmpge_epu16_mask(_mm512_loadu_si512(s + j), t);
    while (m) {
      idx[c++] = static_cast<uint32_t>(j + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; j < n; ++j)
    if (s[j] >= thr) idx[c++] = static_cast<uint32_t>(j);
  return c;
}
#elif defined(__AVX2__)
size_t select_ge_u16(const uint16_t* s, size_t n, uint32_t thr, uint32_t* idx) {
  if (thr > 0xffff) return 0;
  const __m256i t = _mm256_set1_epi16(static_cast<short>(thr));
  size_t c = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j));
    // v >= t  <=>  max(v, t) == v (unsigned)
    const __m256i ge = _mm256_cmpeq_epi16(_mm256_max_epu16(v, t), v);
    uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(ge));
    while (m) {
      const int b = __builtin_ctz(m);
      idx[c++] = static_cast<uint32_t>(j + b / 2);
      m &= ~(3u << b);
    }
  }
  for (; j < n; ++j)
    if (s[j] >= thr) idx[c++] = static_cast<uint32_t>(j);
  return c;
}
#else
size_t select_ge_u16(const uint16_t* s, size_t n, uint32_t thr, uint32_t* idx) {
  size_t c = 0;
  for (size_t j = 0; j < n; ++j)
    if (s[j] >= thr) idx[c++] = static_cast<uint32_t>(j);
  return c;
}
#endif

const Kernels table = {PYKNN_LEVEL_NAME, MR, NR, dot, l2sq, dot_many, l2sq_many, norms_sq,
                       pack, gemm, select_ge, max_of, pq8_scan, pq4_scan, select_ge_u16,
                       dot_gather, l2sq_gather, PYKNN_HALF_KERNELS, nearest_small};

}  // namespace
}  // namespace PYKNN_KNS

const Kernels* PYKNN_GETTER() { return &PYKNN_KNS::table; }

}  // namespace simd
}  // namespace pyknn
