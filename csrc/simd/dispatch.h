// The kernel table: one per instruction-set level, chosen once, lowerable at run time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pyknn {
namespace simd {

enum class Level { Scalar = 0, AVX2 = 1, AVX512 = 2 };

struct Kernels {
  const char* name;
  int mr;  // queries per register tile of `gemm`
  int nr;  // vectors per packed panel of `pack` / `gemm`

  // <a, b> and ||a - b||^2 over d floats.
  float (*dot)(const float* a, const float* b, size_t d);
  float (*l2sq)(const float* a, const float* b, size_t d);
  // One query against n row-major vectors x (n x d): out[i] = <q, x_i> or ||q - x_i||^2.
  void (*dot_many)(const float* q, const float* x, size_t n, size_t d, float* out);
  void (*l2sq_many)(const float* q, const float* x, size_t n, size_t d, float* out);
  // out[i] = ||x_i||^2.
  void (*norms_sq)(const float* x, size_t n, size_t d, float* out);
  // Packs nb row-major vectors into ceil(nb / nr) panels of nr x d floats, dimension-major inside a
  // panel, zero-padded; `packed` must hold packed_size(nb, d) floats, 64-byte aligned.
  void (*pack)(const float* x, size_t nb, size_t d, float* packed);
  // out[i * ldo + j] = <q_i, x_j> for mq row-major queries q (stride ldq) and a packed block of nb
  // vectors. Writes whole panels: ldo >= round_up(nb, nr) and the padding columns get 0.
  void (*gemm)(const float* q, size_t ldq, size_t mq, const float* packed, size_t nb, size_t d,
               float* out, size_t ldo);
  // Writes the positions j < n with s[j] >= thr to idx in ascending order; returns their count.
  size_t (*select_ge)(const float* s, size_t n, float thr, uint32_t* idx);
  // The largest of s[0..n) (-inf when n == 0); s must not hold NaN.
  float (*max)(const float* s, size_t n);
  // Product-quantizer scans (appended; see index/ivf_pq.h).
  // 8-bit ADC: out[i] = bias + sum_m lut[m * 256 + codes[i * M + m]], codes n x M.
  void (*pq8_scan)(const float* lut, const uint8_t* codes, size_t n, size_t M, float bias,
                   float* out);
  // 4-bit fast scan over nblocks blocks of 32 vectors (M even). A block holds M groups of 16
  // bytes; byte j of group m is code(v_j, m) | code(v_{j+16}, m) << 4. lut: M x 16 uint8 (the
  // quantised tables); out[32 b + j] = sum_m lut[16 m + code(v_j, m)] in uint16 (the caller keeps
  // M * max(lut) < 65536).
  void (*pq4_scan)(const uint8_t* codes, size_t nblocks, size_t M, const uint8_t* lut,
                   uint16_t* out);
  // Writes the positions j < n with s[j] >= thr to idx in ascending order; returns their count
  // (the integer screen of the 4-bit scan sums).
  size_t (*select_ge_u16)(const uint16_t* s, size_t n, uint32_t thr, uint32_t* idx);
  // One query against n rows chosen by index: out[i] = <q, x> or ||q - x||^2 for
  // x = base + idx[i] * d (the neighbours of a graph node).
  void (*dot_gather)(const float* q, const float* base, const uint32_t* idx, size_t n, size_t d,
                     float* out);
  void (*l2sq_gather)(const float* q, const float* base, const uint32_t* idx, size_t n,
                      size_t d, float* out);
  // The same against half-precision rows (IEEE binary16 bit patterns); null at levels without
  // F16C, where callers use the float32 rows.
  void (*dot_gather_h)(const float* q, const uint16_t* base, const uint32_t* idx, size_t n,
                       size_t d, float* out);
  void (*l2sq_gather_h)(const float* q, const uint16_t* base, const uint32_t* idx, size_t n,
                        size_t d, float* out);
  // out[i] = x[i] rounded to half precision (nearest even; values beyond the half range become
  // +-inf); returns max |x[i]| of the float32 input. Null where gather_h is null.
  float (*to_half)(const float* x, size_t n, uint16_t* out);
  // out[i] = x[i] widened to float32. Null where gather_h is null.
  void (*from_half)(const uint16_t* x, size_t n, float* out);
  // Nearest of the centroids for n points of small dimension d, directly (no matrix product):
  // ct is d x kp dimension-major (kp a multiple of nr / 2), init the kp starting scores (0, or
  // +inf / -inf for padding columns). labels[i], best[i]: the index and ||x - c||^2, or with ip
  // the largest <x, c>; ties go to the smaller index.
  void (*nearest_small)(const float* x, size_t n, size_t d, const float* ct, const float* init,
                        size_t kp, bool ip, int64_t* labels, float* best);
};

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }
inline size_t packed_size(const Kernels& k, size_t nb, size_t d) {
  return round_up(nb, static_cast<size_t>(k.nr)) * d;
}

// The levels this CPU and OS support, lowest first (always starts with Scalar).
std::vector<Level> available_levels();
Level max_level();
Level current_level();
const char* level_name(Level level);
// Parses "scalar" | "avx2" | "avx512" | "auto"; throws ValueError for other names and for levels
// this CPU lacks (the message lists the available ones).
Level parse_level(const std::string& name);
void set_level(Level level);

// The kernels of the current level. Callers fetch this once per batch, not per vector.
const Kernels& kernels();
const Kernels& kernels_for(Level level);

}  // namespace simd
}  // namespace pyknn
