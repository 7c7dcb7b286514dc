#include "simd/dispatch.h"

#include <atomic>
#include <cstdlib>

#include "common/errors.h"
#include "simd/cpu_features.h"

namespace pyknn {
namespace simd {

// Each defined in its own translation unit, compiled with that level's flags.
const Kernels* kernels_scalar();
#if defined(PYKNN_HAVE_X86_LEVELS)
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
#endif

namespace {

std::atomic<int>& current() {
  static std::atomic<int> level{static_cast<int>(max_level())};
  return level;
}

}  // namespace

std::vector<Level> available_levels() {
  std::vector<Level> levels{Level::Scalar};
#if defined(PYKNN_HAVE_X86_LEVELS)
  const CpuFeatures& f = cpu_features();
  if (f.avx2_fma) levels.push_back(Level::AVX2);
  if (f.avx512) levels.push_back(Level::AVX512);
#endif
  return levels;
}

Level max_level() { return available_levels().back(); }

Level current_level() { return static_cast<Level>(current().load()); }

const char* level_name(Level level) {
  switch (level) {
    case Level::Scalar: return "scalar";
    case Level::AVX2: return "avx2";
    case Level::AVX512: return "avx512";
  }
  return "unknown";
}

Level parse_level(const std::string& name) {
  std::string available;
  for (Level l : available_levels()) {
    if (!available.empty()) available += ", ";
    available += level_name(l);
  }
  if (name == "auto" || name == "best") return max_level();
  for (Level l : {Level::Scalar, Level::AVX2, Level::AVX512}) {
    if (name == level_name(l)) {
      for (Level a : available_levels())
        if (a == l) return l;
      throw_value("SIMD level '" + name + "' is not supported by this CPU (available: " +
                  available + ")");
    }
  }
  throw_value("unknown SIMD level '" + name + "' (expected one of: scalar, avx2, avx512, auto; "
              "this CPU supports: " + available + ")");
}

void set_level(Level level) { current().store(static_cast<int>(level)); }

const Kernels& kernels_for(Level level) {
  switch (level) {
#if defined(PYKNN_HAVE_X86_LEVELS)
    case Level::AVX512: return *kernels_avx512();
    case Level::AVX2: return *kernels_avx2();
#endif
    default: return *kernels_scalar();
  }
}

const Kernels& kernels() { return kernels_for(current_level()); }

}  // namespace simd
}  // namespace pyknn
