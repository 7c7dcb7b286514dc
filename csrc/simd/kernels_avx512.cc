// The kernels at the avx512 level (flags set for this file in CMakeLists.txt).
#define PYKNN_KNS ns_avx512
#define PYKNN_VW 16
#define PYKNN_MR 12
#define PYKNN_LEVEL_NAME "avx512"
#define PYKNN_GETTER kernels_avx512
#include "simd/kernels-inl.h"
