// The kernels at the avx2 level (flags set for this file in CMakeLists.txt).
#define PYKNN_KNS ns_avx2
#define PYKNN_VW 8
#define PYKNN_MR 6
#define PYKNN_LEVEL_NAME "avx2"
#define PYKNN_GETTER kernels_avx2
#include "simd/kernels-inl.h"
