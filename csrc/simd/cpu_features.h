#pragma once

namespace pyknn {
namespace simd {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C with YMM state enabled by the OS
  bool avx512 = false;    // AVX-512 F/BW/DQ/VL/CD with ZMM and opmask state enabled by the OS
};

// cpuid leaves 1 and 7 plus xgetbv; computed once.
const CpuFeatures& cpu_features();

}  // namespace simd
}  // namespace pyknn
