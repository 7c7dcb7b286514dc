// Shared helpers for the bind_*.cc files: array intake and shapes.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/errors.h"

namespace pyknn {
namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using MaskArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// Rows of a (n, dim) float32 matrix; the Python layer has already converted and shaped it.
inline size_t rows_checked(const FloatArray& x, size_t dim, const char* what) {
  if (x.ndim() != 2 || static_cast<size_t>(x.shape(1)) != dim)
    throw_value(std::string(what) + ": expected a 2-D array with " + std::to_string(dim) +
                " columns");
  return static_cast<size_t>(x.shape(0));
}

inline size_t len_checked(const IdArray& ids, size_t expected, const char* what) {
  if (ids.ndim() != 1 || static_cast<size_t>(ids.shape(0)) != expected)
    throw_value(std::string(what) + ": expected " + std::to_string(expected) + " ids, got " +
                std::to_string(ids.ndim() == 1 ? ids.shape(0) : ids.size()));
  return expected;
}

void bind_indexes(py::module_& m);
void bind_kmeans(py::module_& m);

}  // namespace pyknn
