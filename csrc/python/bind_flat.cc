// Bindings of the Index base class and FlatIndex: convert, release the GIL, call.
#include <pybind11/stl.h>

#include "index/flat.h"
#include "python/common.h"

namespace pyknn {

namespace {

Filter make_filter(const py::object& filter_ids, const py::object& filter_mask, IdArray* ids_keep,
                   MaskArray* mask_keep) {
  Filter f;
  if (!filter_ids.is_none()) {
    *ids_keep = filter_ids.cast<IdArray>();
    f.ids = ids_keep->data();
    f.n_ids = static_cast<size_t>(ids_keep->size());
  } else if (!filter_mask.is_none()) {
    *mask_keep = filter_mask.cast<MaskArray>();
    f.mask = mask_keep->data();
    f.mask_len = static_cast<size_t>(mask_keep->size());
  }
  return f;
}

}  // namespace

void bind_flat(py::module_& m) {
  py::class_<Index>(m, "Index")
      .def_property_readonly("dim", &Index::dim)
      .def_property_readonly("metric", [](const Index& i) { return metric_name(i.metric()); })
      .def_property_readonly("kind", [](const Index& i) { return static_cast<int>(i.kind()); })
      .def("__len__", &Index::size)
      .def("memory_usage", &Index::memory_usage)
      .def_property("metadata", &Index::metadata, &Index::set_metadata)
      .def("save", [](const Index& i, const std::string& path) {
        py::gil_scoped_release nogil;
        i.save(path);
      })
      .def("to_bytes", [](const Index& i) {
        std::string s;
        {
          py::gil_scoped_release nogil;
          s = i.to_bytes();
        }
        return py::bytes(s);
      });

  py::class_<FlatIndex, Index>(m, "FlatIndex")
      .def(py::init([](size_t dim, const std::string& metric) {
             return std::make_unique<FlatIndex>(dim, parse_metric(metric));
           }),
           py::arg("dim"), py::arg("metric"))
      .def("add",
           [](FlatIndex& idx, FloatArray x, py::object ids) {
             size_t n = rows_checked(x, idx.dim(), "vectors");
             IdArray id_arr;
             const int64_t* idp = nullptr;
             if (!ids.is_none()) {
               id_arr = ids.cast<IdArray>();
               len_checked(id_arr, n, "ids");
               idp = id_arr.data();
             }
             py::gil_scoped_release nogil;
             idx.add(x.data(), n, idp);
           },
           py::arg("x"), py::arg("ids") = py::none())
      .def("search",
           [](const FlatIndex& idx, FloatArray q, size_t k, py::object filter_ids,
              py::object filter_mask) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             IdArray ids_keep;
             MaskArray mask_keep;
             Filter f = make_filter(filter_ids, filter_mask, &ids_keep, &mask_keep);
             py::array_t<float> D({nq, k});
             py::array_t<int64_t> I({nq, k});
             float* dp = D.mutable_data();
             int64_t* ip = I.mutable_data();
             {
               py::gil_scoped_release nogil;
               idx.search(q.data(), nq, k, f, dp, ip);
             }
             return py::make_tuple(D, I);
           },
           py::arg("q"), py::arg("k"), py::arg("filter_ids") = py::none(),
           py::arg("filter_mask") = py::none())
      .def("get",
           [](const FlatIndex& idx, IdArray ids) {
             size_t n = static_cast<size_t>(ids.size());
             py::array_t<float> out({n, idx.dim()});
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               idx.get(ids.data(), n, op);
             }
             return out;
           })
      .def("remove",
           [](FlatIndex& idx, IdArray ids, bool missing_ok) {
             py::gil_scoped_release nogil;
             return idx.remove(ids.data(), static_cast<size_t>(ids.size()), missing_ok);
           },
           py::arg("ids"), py::arg("missing_ok") = false)
      .def("contains", &FlatIndex::contains)
      .def("ids", [](const FlatIndex& idx) {
        std::vector<int64_t> v = idx.ids();
        py::array_t<int64_t> out(v.size());
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      });

  m.def("load", [](const std::string& path) {
    py::gil_scoped_release nogil;
    return load_index(path);
  });
  m.def("from_bytes", [](py::bytes b) {
    std::string s = b;
    py::gil_scoped_release nogil;
    return index_from_bytes(s.data(), s.size());
  });
}

}  // namespace pyknn
