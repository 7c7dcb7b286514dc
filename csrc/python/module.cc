// pyknn._core: the compiled module. Exceptions from the core are mapped here, in one place.
#include <pybind11/stl.h>

#include "common/threadpool.h"
#include "index/index.h"
#include "python/common.h"
#include "simd/dispatch.h"

namespace pyknn {
namespace {

PyObject* g_format_error = nullptr;

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const Error& e) {
    switch (e.kind()) {
      case ErrorKind::Value: PyErr_SetString(PyExc_ValueError, e.what()); return;
      case ErrorKind::Key: PyErr_SetString(PyExc_KeyError, e.what()); return;
      case ErrorKind::Format: PyErr_SetString(g_format_error, e.what()); return;
      case ErrorKind::IO: {
        // OSError(errno, msg) becomes FileNotFoundError, PermissionError ... as appropriate.
        PyObject* args = Py_BuildValue("(is)", e.os_errno(), e.what());
        PyErr_SetObject(PyExc_OSError, args);
        Py_XDECREF(args);
        return;
      }
      case ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
    }
  }
}

const simd::Kernels& kernels_named(const std::string& level) {
  return simd::kernels_for(simd::parse_level(level));
}

// Direct access to one level's kernels, so tests can check every compiled level against numpy.
void bind_kernel_hooks(py::module_& m) {
  m.def("_kernel_dot_many", [](const std::string& level, FloatArray q, FloatArray x) {
    const simd::Kernels& K = kernels_named(level);
    size_t d = static_cast<size_t>(q.shape(0)), n = rows_checked(x, d, "x");
    py::array_t<float> out(n);
    K.dot_many(q.data(), x.data(), n, d, out.mutable_data());
    return out;
  });
  m.def("_kernel_l2sq_many", [](const std::string& level, FloatArray q, FloatArray x) {
    const simd::Kernels& K = kernels_named(level);
    size_t d = static_cast<size_t>(q.shape(0)), n = rows_checked(x, d, "x");
    py::array_t<float> out(n);
    K.l2sq_many(q.data(), x.data(), n, d, out.mutable_data());
    return out;
  });
  // Rows of x picked by idx (any order, repeats allowed), as the graph search gathers them.
  m.def("_kernel_gather", [](const std::string& level, bool l2, FloatArray q, FloatArray x,
                             py::array_t<uint32_t, py::array::c_style | py::array::forcecast> idx) {
    const simd::Kernels& K = kernels_named(level);
    size_t d = static_cast<size_t>(q.shape(0)), n = rows_checked(x, d, "x");
    const size_t m = static_cast<size_t>(idx.size());
    for (size_t i = 0; i < m; ++i)
      if (idx.data()[i] >= n) throw_value("gather index out of range");
    py::array_t<float> out(m);
    (l2 ? K.l2sq_gather : K.dot_gather)(q.data(), x.data(), idx.data(), m, d, out.mutable_data());
    return out;
  });
  // Half-precision rows (uint16 bit patterns, as numpy's float16.view(uint16)); None at levels
  // without them.
  m.def("_kernel_gather_half", [](const std::string& level, bool l2, FloatArray q,
                                  py::array_t<uint16_t, py::array::c_style | py::array::forcecast> x,
                                  py::array_t<uint32_t, py::array::c_style | py::array::forcecast> idx)
            -> py::object {
    const simd::Kernels& K = kernels_named(level);
    if (!K.dot_gather_h) return py::none();
    const size_t d = static_cast<size_t>(q.shape(0));
    if (x.ndim() != 2 || static_cast<size_t>(x.shape(1)) != d) throw_value("x must be n x d");
    const size_t n = static_cast<size_t>(x.shape(0)), m = static_cast<size_t>(idx.size());
    for (size_t i = 0; i < m; ++i)
      if (idx.data()[i] >= n) throw_value("gather index out of range");
    py::array_t<float> out(m);
    (l2 ? K.l2sq_gather_h : K.dot_gather_h)(q.data(), x.data(), idx.data(), m, d,
                                            out.mutable_data());
    return std::move(out);
  });
  // (x rounded to half precision as uint16, max |x|) and the widened round trip; None at levels
  // without half kernels.
  m.def("_kernel_half_round_trip", [](const std::string& level, FloatArray x) -> py::object {
    const simd::Kernels& K = kernels_named(level);
    if (!K.to_half) return py::none();
    const size_t n = static_cast<size_t>(x.size());
    py::array_t<uint16_t> h(n);
    py::array_t<float> back(n);
    const float mx = K.to_half(x.data(), n, h.mutable_data());
    K.from_half(h.data(), n, back.mutable_data());
    return py::make_tuple(h, mx, back);
  });
  m.def("_kernel_dot", [](const std::string& level, FloatArray a, FloatArray b) {
    return kernels_named(level).dot(a.data(), b.data(), static_cast<size_t>(a.shape(0)));
  });
  m.def("_kernel_l2sq", [](const std::string& level, FloatArray a, FloatArray b) {
    return kernels_named(level).l2sq(a.data(), b.data(), static_cast<size_t>(a.shape(0)));
  });
  m.def("_kernel_norms_sq", [](const std::string& level, FloatArray x) {
    const simd::Kernels& K = kernels_named(level);
    size_t n = static_cast<size_t>(x.shape(0)), d = static_cast<size_t>(x.shape(1));
    py::array_t<float> out(n);
    K.norms_sq(x.data(), n, d, out.mutable_data());
    return out;
  });
  // q (m x d) times x (n x d) transposed through pack + gemm.
  m.def("_kernel_gemm", [](const std::string& level, FloatArray q, FloatArray x) {
    const simd::Kernels& K = kernels_named(level);
    size_t mq = static_cast<size_t>(q.shape(0)), d = static_cast<size_t>(q.shape(1));
    size_t n = rows_checked(x, d, "x");
    size_t ldo = simd::round_up(n, static_cast<size_t>(K.nr));
    std::vector<float> packed(simd::packed_size(K, n, d) + 16);
    std::vector<float> tile(mq * ldo + 1);
    K.pack(x.data(), n, d, packed.data());
    K.gemm(q.data(), d, mq, packed.data(), n, d, tile.data(), ldo);
    py::array_t<float> out({mq, n});
    for (size_t i = 0; i < mq; ++i)
      std::copy(tile.begin() + i * ldo, tile.begin() + i * ldo + n, out.mutable_data() + i * n);
    return out;
  });
  // 8-bit ADC scan: lut (M x 256), codes (n x M).
  m.def("_kernel_pq8_scan", [](const std::string& level, FloatArray lut,
                               py::array_t<uint8_t, py::array::c_style | py::array::forcecast> codes,
                               float bias) {
    const simd::Kernels& K = kernels_named(level);
    if (codes.ndim() != 2 || static_cast<size_t>(lut.size()) != static_cast<size_t>(codes.shape(1)) * 256)
      throw_value("pq8_scan: lut must hold 256 entries per code byte");
    size_t n = static_cast<size_t>(codes.shape(0)), M = static_cast<size_t>(codes.shape(1));
    py::array_t<float> out(n);
    K.pq8_scan(lut.data(), codes.data(), n, M, bias, out.mutable_data());
    return out;
  });
  // 4-bit fast scan: blocks (nblocks x M*16 bytes in the interleaved layout), lut (M x 16 uint8).
  m.def("_kernel_pq4_scan", [](const std::string& level,
                               py::array_t<uint8_t, py::array::c_style | py::array::forcecast> blocks,
                               py::array_t<uint8_t, py::array::c_style | py::array::forcecast> lut) {
    const simd::Kernels& K = kernels_named(level);
    size_t M = static_cast<size_t>(lut.size()) / 16;
    if (M == 0 || M % 2 || static_cast<size_t>(lut.size()) != M * 16 ||
        static_cast<size_t>(blocks.size()) % (M * 16))
      throw_value("pq4_scan: lut must be M x 16 with M even, blocks a multiple of M * 16 bytes");
    size_t nb = static_cast<size_t>(blocks.size()) / (M * 16);
    py::array_t<uint16_t> out(nb * 32);
    K.pq4_scan(blocks.data(), nb, M, lut.data(), out.mutable_data());
    return out;
  });
  // Positions of the uint16 sums >= thr (the 4-bit scan's screen).
  m.def("_kernel_select_ge_u16", [](const std::string& level,
                                    py::array_t<uint16_t, py::array::c_style | py::array::forcecast> s,
                                    uint32_t thr) {
    const simd::Kernels& K = kernels_named(level);
    const size_t n = static_cast<size_t>(s.size());
    std::vector<uint32_t> idx(n + 1);
    const size_t c = K.select_ge_u16(s.data(), n, thr, idx.data());
    py::array_t<uint32_t> out(c);
    std::copy(idx.begin(), idx.begin() + c, out.mutable_data());
    return out;
  });
  m.def("_kernel_max", [](const std::string& level, FloatArray s) {
    return kernels_named(level).max(s.data(), static_cast<size_t>(s.size()));
  });
  m.def("_kernel_select_ge", [](const std::string& level, FloatArray s, float thr) {
    const simd::Kernels& K = kernels_named(level);
    size_t n = static_cast<size_t>(s.size());
    std::vector<uint32_t> idx(n + 1);
    size_t c = K.select_ge(s.data(), n, thr, idx.data());
    return std::vector<uint32_t>(idx.begin(), idx.begin() + c);
  });
}

}  // namespace

}  // namespace pyknn

PYBIND11_MODULE(_core, m) {
  using namespace pyknn;
  m.doc() = "pyknn compiled core (private; use the pyknn package)";
  g_format_error = PyErr_NewExceptionWithDoc(
      "pyknn.FormatError",
      "An index file or byte string is truncated, corrupted, foreign or of an unsupported format "
      "version.",
      PyExc_ValueError, nullptr);
  m.attr("FormatError") = py::handle(g_format_error);
  py::register_exception_translator(&translate);

  m.def("simd_level", [] { return std::string(simd::level_name(simd::current_level())); },
        "Name of the instruction-set level the kernels run at now.");
  m.def("set_simd_level",
        [](const std::string& name) { simd::set_level(simd::parse_level(name)); },
        py::arg("name"));
  m.def("available_simd_levels", [] {
    std::vector<std::string> names;
    for (auto l : simd::available_levels()) names.push_back(simd::level_name(l));
    return names;
  });
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  bind_kernel_hooks(m);
  bind_indexes(m);
  bind_kmeans(m);
}
