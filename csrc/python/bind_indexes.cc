// Bindings of the Index base class and the index types: convert, release the GIL, call.
#include <pybind11/stl.h>

#include "index/flat.h"
#include "index/hnsw.h"
#include "index/ivf_flat.h"
#include "python/common.h"

namespace pyknn {

namespace {

struct FilterArgs {
  IdArray ids;
  MaskArray mask;
  Filter filter;

  FilterArgs(const py::object& filter_ids, const py::object& filter_mask) {
    if (!filter_ids.is_none()) {
      ids = filter_ids.cast<IdArray>();
      filter.ids = ids.data();
      filter.n_ids = static_cast<size_t>(ids.size());
    } else if (!filter_mask.is_none()) {
      mask = filter_mask.cast<MaskArray>();
      filter.mask = mask.data();
      filter.mask_len = static_cast<size_t>(mask.size());
    }
  }
};

template <class T>
py::array_t<int64_t> to_array(const std::vector<T>& v) {
  py::array_t<int64_t> out(v.size());
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// Runs the index's search (a callable taking the output pointers) and returns (D, I).
template <class Fn>
py::tuple search_into(size_t nq, size_t k, Fn&& fn) {
  py::array_t<float> D({nq, k});
  py::array_t<int64_t> I({nq, k});
  float* dp = D.mutable_data();
  int64_t* ip = I.mutable_data();
  {
    py::gil_scoped_release nogil;
    fn(dp, ip);
  }
  return py::make_tuple(D, I);
}

// The id-keyed storage methods every index type has with the same signatures.
template <class T, class Cls>
void def_storage(Cls& cls) {
  cls.def("add",
          [](T& idx, FloatArray x, py::object ids) {
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
      .def("get",
           [](const T& idx, IdArray ids) {
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
           [](T& idx, IdArray ids, bool missing_ok) {
             py::gil_scoped_release nogil;
             return idx.remove(ids.data(), static_cast<size_t>(ids.size()), missing_ok);
           },
           py::arg("ids"), py::arg("missing_ok") = false)
      .def("contains", &T::contains)
      .def("ids", [](const T& idx) { return to_array(idx.ids()); });
}

}  // namespace

void bind_indexes(py::module_& m) {
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

  py::class_<FlatIndex, Index> flat(m, "FlatIndex");
  flat.def(py::init([](size_t dim, const std::string& metric) {
             return std::make_unique<FlatIndex>(dim, parse_metric(metric));
           }),
           py::arg("dim"), py::arg("metric"))
      .def("search",
           [](const FlatIndex& idx, FloatArray q, size_t k, py::object filter_ids,
              py::object filter_mask) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             FilterArgs f(filter_ids, filter_mask);
             return search_into(nq, k, [&](float* D, int64_t* I) {
               idx.search(q.data(), nq, k, f.filter, D, I);
             });
           },
           py::arg("q"), py::arg("k"), py::arg("filter_ids") = py::none(),
           py::arg("filter_mask") = py::none());
  def_storage<FlatIndex>(flat);

  py::class_<IVFFlatIndex, Index> ivf(m, "IVFFlatIndex");
  ivf.def(py::init([](size_t dim, const std::string& metric, size_t nlist, size_t nprobe) {
            return std::make_unique<IVFFlatIndex>(dim, parse_metric(metric), nlist, nprobe);
          }),
          py::arg("dim"), py::arg("metric"), py::arg("nlist"), py::arg("nprobe"))
      .def_property_readonly("nlist", &IVFFlatIndex::nlist)
      .def_property("nprobe", &IVFFlatIndex::nprobe, &IVFFlatIndex::set_nprobe)
      .def_property_readonly("is_trained", &IVFFlatIndex::is_trained)
      .def("train",
           [](IVFFlatIndex& idx, FloatArray x, int n_iter, uint64_t seed, bool plus_plus) {
             size_t n = rows_checked(x, idx.dim(), "training vectors");
             py::gil_scoped_release nogil;
             idx.train(x.data(), n, n_iter, seed, plus_plus);
           },
           py::arg("x"), py::arg("n_iter"), py::arg("seed"), py::arg("kmeans_plus_plus"))
      .def("search",
           [](const IVFFlatIndex& idx, FloatArray q, size_t k, size_t nprobe,
              py::object filter_ids, py::object filter_mask) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             FilterArgs f(filter_ids, filter_mask);
             return search_into(nq, k, [&](float* D, int64_t* I) {
               idx.search(q.data(), nq, k, nprobe, f.filter, D, I);
             });
           },
           py::arg("q"), py::arg("k"), py::arg("nprobe"), py::arg("filter_ids") = py::none(),
           py::arg("filter_mask") = py::none())
      .def("list_sizes", [](const IVFFlatIndex& idx) { return to_array(idx.list_sizes()); })
      .def("centroids", [](const IVFFlatIndex& idx) {
        std::vector<float> c = idx.centroids();
        py::array_t<float> out({c.size() / idx.dim(), idx.dim()});
        std::copy(c.begin(), c.end(), out.mutable_data());
        return out;
      });
  def_storage<IVFFlatIndex>(ivf);

  py::class_<HNSWIndex, Index> hnsw(m, "HNSWIndex");
  hnsw.def(py::init([](size_t dim, const std::string& metric, size_t M, size_t ef_construction,
                       uint64_t seed) {
             return std::make_unique<HNSWIndex>(dim, parse_metric(metric), M, ef_construction,
                                                seed);
           }),
           py::arg("dim"), py::arg("metric"), py::arg("M"), py::arg("ef_construction"),
           py::arg("seed"))
      .def_property_readonly("M", &HNSWIndex::M)
      .def_property_readonly("ef_construction", &HNSWIndex::ef_construction)
      .def_property_readonly("seed", &HNSWIndex::seed)
      .def_property_readonly("max_level", &HNSWIndex::max_level)
      .def_property_readonly("read_only", &HNSWIndex::read_only)
      .def("search",
           [](const HNSWIndex& idx, FloatArray q, size_t k, size_t ef_search,
              py::object filter_ids, py::object filter_mask) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             FilterArgs f(filter_ids, filter_mask);
             return search_into(nq, k, [&](float* D, int64_t* I) {
               idx.search(q.data(), nq, k, ef_search, f.filter, D, I);
             });
           },
           py::arg("q"), py::arg("k"), py::arg("ef_search"), py::arg("filter_ids") = py::none(),
           py::arg("filter_mask") = py::none());
  def_storage<HNSWIndex>(hnsw);

  m.def("load", [](const std::string& path, bool mmap) {
    py::gil_scoped_release nogil;
    return load_index(path, mmap);
  }, py::arg("path"), py::arg("mmap") = false);
  m.def("from_bytes", [](py::bytes b) {
    std::string s = b;
    py::gil_scoped_release nogil;
    return index_from_bytes(s.data(), s.size());
  });
}

}  // namespace pyknn
