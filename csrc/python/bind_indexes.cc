// Bindings of the Index base class and the index types: convert, release the GIL, call.
#include <pybind11/stl.h>

#include "index/flat.h"
#include "index/hnsw.h"
#include "index/ivf_flat.h"
#include "index/ivf_pq.h"
#include "index/pq.h"
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
  flat.def("rerank",
           [](const FlatIndex& idx, FloatArray q, IdArray cand, size_t k) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             if (cand.ndim() != 2 || static_cast<size_t>(cand.shape(0)) != nq)
               throw_value("candidates: expected a 2-D array with one row per query");
             const size_t r = static_cast<size_t>(cand.shape(1));
             return search_into(nq, k, [&](float* D, int64_t* I) {
               idx.rerank(q.data(), nq, cand.data(), r, k, D, I);
             });
           },
           py::arg("q"), py::arg("candidates"), py::arg("k"));
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

  using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
  py::class_<ProductQuantizer>(m, "ProductQuantizer")
      .def(py::init<size_t, size_t, size_t>(), py::arg("dim"), py::arg("pq_m"), py::arg("nbits"))
      .def_property_readonly("dim", &ProductQuantizer::dim)
      .def_property_readonly("pq_m", &ProductQuantizer::pq_m)
      .def_property_readonly("nbits", &ProductQuantizer::nbits)
      .def_property_readonly("dsub", &ProductQuantizer::dsub)
      .def_property_readonly("ksub", &ProductQuantizer::ksub)
      .def_property_readonly("code_size", &ProductQuantizer::code_size)
      .def_property_readonly("is_trained", &ProductQuantizer::is_trained)
      .def("train",
           [](ProductQuantizer& pq, FloatArray x, int n_iter, uint64_t seed) {
             size_t n = rows_checked(x, pq.dim(), "training vectors");
             py::gil_scoped_release nogil;
             pq.train(x.data(), n, n_iter, seed);
           })
      .def("encode",
           [](const ProductQuantizer& pq, FloatArray x) {
             size_t n = rows_checked(x, pq.dim(), "vectors");
             py::array_t<uint8_t> out({n, pq.code_size()});
             uint8_t* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               check_finite(x.data(), n, pq.dim(), "vectors");
               std::vector<uint8_t> u(n * pq.pq_m());
               pq.encode(x.data(), n, u.data());
               pq.pack_codes(u.data(), n, op);
             }
             return out;
           })
      .def("decode",
           [](const ProductQuantizer& pq, U8Array codes) {
             if (codes.ndim() != 2 || static_cast<size_t>(codes.shape(1)) != pq.code_size())
               throw_value("codes: expected a 2-D uint8 array with code_size = " +
                           std::to_string(pq.code_size()) + " columns");
             size_t n = static_cast<size_t>(codes.shape(0));
             py::array_t<float> out({n, pq.dim()});
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               std::vector<uint8_t> u(n * pq.pq_m());
               pq.unpack_codes(codes.data(), n, u.data());
               pq.decode(u.data(), n, op);
             }
             return out;
           })
      .def("centroids",
           [](const ProductQuantizer& pq) {
             const auto& c = pq.centroids();
             py::array_t<float> out({c.empty() ? size_t(0) : pq.pq_m(), pq.ksub(), pq.dsub()});
             std::copy(c.begin(), c.end(), out.mutable_data());
             return out;
           })
      .def("set_centroids", [](ProductQuantizer& pq, FloatArray c) {
        std::vector<float> v(c.data(), c.data() + c.size());
        check_finite(v.data(), 1, v.size(), "centroids");
        pq.set_centroids(std::move(v));
      });

  py::class_<IVFPQIndex, Index> ivfpq(m, "IVFPQIndex");
  ivfpq.def(py::init([](size_t dim, const std::string& metric, size_t nlist, size_t pq_m,
                        size_t nbits, bool by_residual, int rerank_storage, size_t nprobe,
                        bool single_list) {
              return std::make_unique<IVFPQIndex>(dim, parse_metric(metric), nlist, pq_m, nbits,
                                                  by_residual,
                                                  static_cast<RerankStorage>(rerank_storage),
                                                  nprobe, single_list);
            }),
            py::arg("dim"), py::arg("metric"), py::arg("nlist"), py::arg("pq_m"), py::arg("nbits"),
            py::arg("by_residual"), py::arg("rerank_storage"), py::arg("nprobe"),
            py::arg("single_list"))
      .def_property_readonly("nlist", &IVFPQIndex::nlist)
      .def_property_readonly("pq_m", &IVFPQIndex::pq_m)
      .def_property_readonly("nbits", &IVFPQIndex::nbits)
      .def_property_readonly("by_residual", &IVFPQIndex::by_residual)
      .def_property_readonly("rerank_storage",
                             [](const IVFPQIndex& i) { return static_cast<int>(i.rerank_storage()); })
      .def_property_readonly("code_size", &IVFPQIndex::code_size)
      .def_property("nprobe", &IVFPQIndex::nprobe, &IVFPQIndex::set_nprobe)
      .def_property_readonly("is_trained", &IVFPQIndex::is_trained)
      .def("train",
           [](IVFPQIndex& idx, FloatArray x, int n_iter, int pq_n_iter, uint64_t seed, bool pp) {
             size_t n = rows_checked(x, idx.dim(), "training vectors");
             py::gil_scoped_release nogil;
             idx.train(x.data(), n, n_iter, pq_n_iter, seed, pp);
           })
      .def("search",
           [](const IVFPQIndex& idx, FloatArray q, size_t k, size_t nprobe, size_t rerank,
              py::object filter_ids, py::object filter_mask) {
             size_t nq = rows_checked(q, idx.dim(), "queries");
             FilterArgs f(filter_ids, filter_mask);
             return search_into(nq, k, [&](float* D, int64_t* I) {
               idx.search(q.data(), nq, k, nprobe, rerank, f.filter, D, I);
             });
           },
           py::arg("q"), py::arg("k"), py::arg("nprobe"), py::arg("rerank"),
           py::arg("filter_ids") = py::none(), py::arg("filter_mask") = py::none())
      .def("reconstruct",
           [](const IVFPQIndex& idx, IdArray ids) {
             size_t n = static_cast<size_t>(ids.size());
             py::array_t<float> out({n, idx.dim()});
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               idx.reconstruct(ids.data(), n, op);
             }
             return out;
           })
      .def("codes",
           [](const IVFPQIndex& idx, IdArray ids) {
             size_t n = static_cast<size_t>(ids.size());
             py::array_t<uint8_t> out({n, idx.code_size()});
             uint8_t* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               idx.codes(ids.data(), n, op);
             }
             return out;
           })
      .def("list_sizes", [](const IVFPQIndex& idx) { return to_array(idx.list_sizes()); })
      .def("centroids",
           [](const IVFPQIndex& idx) {
             std::vector<float> c = idx.centroids();
             py::array_t<float> out({c.size() / idx.dim(), idx.dim()});
             std::copy(c.begin(), c.end(), out.mutable_data());
             return out;
           })
      .def("pq_centroids", [](const IVFPQIndex& idx) {
        std::vector<float> c = idx.pq_centroids();
        const size_t ks = size_t(1) << idx.nbits(), ds = idx.dim() / idx.pq_m();
        py::array_t<float> out({c.empty() ? size_t(0) : idx.pq_m(), ks, ds});
        std::copy(c.begin(), c.end(), out.mutable_data());
        return out;
      });
  def_storage<IVFPQIndex>(ivfpq);

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
