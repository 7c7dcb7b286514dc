// The kernels at the scalar level (flags set for this file in CMakeLists.txt).
#define PYKNN_KNS ns_scalar
#define PYKNN_VW 4
#define PYKNN_MR 6
#define PYKNN_LEVEL_NAME "scalar"
#define PYKNN_GETTER kernels_scalar
#include "simd/kernels-inl.h"
