"""index_factory, estimate_memory (against memory_usage) and evaluate."""
import warnings

import numpy as np
import pytest

import pyknn
import pyknn.datasets
from pyknn.factory import parse_spec

from conftest import clustered


@pytest.mark.parametrize("spec,cls,attrs", [
    ("Flat", pyknn.FlatIndex, {}),
    ("IVF64,Flat", pyknn.IVFFlatIndex, {"nlist": 64}),
    ("HNSW32", pyknn.HNSWIndex, {"M": 32}),
    ("HNSW8,Flat", pyknn.HNSWIndex, {"M": 8}),
])
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_factory_builds_the_index(spec, cls, attrs, metric):
    idx = pyknn.index_factory(24, spec, metric=metric)
    assert type(idx) is cls and idx.dim == 24 and idx.metric == metric
    for k, v in attrs.items():
        assert getattr(idx, k) == v


@pytest.mark.parametrize("bad", ["", "flat", "IVF,Flat", "HNSW", "IVF0,Flat", "PQ32x5", "HNSW32,PQ8",
                                 "IVF10,Flat,Refine", "LSH", "PQ0"])
def test_unknown_or_invalid_specs(bad):
    with pytest.raises(ValueError, match="spec"):
        pyknn.index_factory(32, bad)


@pytest.mark.parametrize("bad,message", [
    ("IVF256,PQ50x8", "not divisible by pq_m 50 \\(valid pq_m: \\[1, 2, 3"),
    ("IVF256,PQ48x8fs", "fast scan"),
    ("IVF16,PQ48x5", "nbits 5 is not supported"),
    ("PQ3x4", "even pq_m"),
    ("IVF8388608,Flat", "nlist must be at most 4194304"),
    ("HNSW1", "M must be at least 2"),
    ("HNSW32,Refine", "Refine applies to compressed"),
])
def test_factory_and_estimate_reject_the_same_specs(bad, message):
    """estimate_memory never prices an index that index_factory refuses to build."""
    with pytest.raises(ValueError, match=message):
        pyknn.index_factory(384, bad)
    with pytest.raises(ValueError, match=message):
        pyknn.estimate_memory(1000, 384, bad)


@pytest.mark.parametrize("spec,nbits", [("PQ8", 8), ("PQ16x4fs", 4), ("PQ8x8,Refine", 8)])
def test_factory_builds_pq_index(spec, nbits):
    idx = pyknn.index_factory(32, spec, metric="l2")
    base = idx.base if spec.endswith("Refine") else idx
    assert type(base) is pyknn.PQIndex and base.nbits == nbits and base.metric == "l2"
    assert type(idx) is (pyknn.RefineIndex if spec.endswith("Refine") else pyknn.PQIndex)


def test_pq_specs_parse_and_wait_for_ivfpq():
    s = parse_spec("IVF1024,PQ48x4fs,Refine")
    assert s.kind == "ivf_pq" and s.refine
    assert s.params == {"nlist": 1024, "pq_m": 48, "nbits": 4, "fast_scan": True}
    assert parse_spec("IVF1024,PQ32x8").params["nbits"] == 8
    idx = pyknn.index_factory(384, "IVF1024,PQ32x8", metric="l2")
    assert type(idx) is pyknn.IVFPQIndex and (idx.nlist, idx.pq_m, idx.nbits) == (1024, 32, 8)
    refined = pyknn.index_factory(384, "IVF256,PQ48x4fs,Refine")
    assert type(refined) is pyknn.RefineIndex and refined.base.nbits == 4
    with pytest.raises(ValueError, match="fast scan .* 4-bit"):
        pyknn.index_factory(384, "IVF256,PQ48x8fs")
    with pytest.raises(ValueError, match="not divisible"):
        pyknn.index_factory(384, "IVF256,PQ50x8")


@pytest.mark.parametrize("spec", ["Flat", "IVF32,Flat", "HNSW16", "HNSW32", "IVF32,PQ12x8",
                                  "IVF32,PQ12x4fs", "IVF16,PQ8x4,Refine", "PQ12x8",
                                  "PQ12x4fs,Refine", "IVF1024,PQ12x4fs"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_estimate_memory_agrees_with_memory_usage(spec, metric):
    n, dim = 6000, 48
    x = clustered(n, dim, seed=1)
    idx = pyknn.index_factory(dim, spec, metric=metric)
    if hasattr(idx, "train"):
        idx.train(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyknn.NormWarning)
        idx.add(x)
    est, real = pyknn.estimate_memory(n, dim, spec, metric=metric), idx.memory_usage()
    # Exact but for the hash map's bucket count (and HNSW's random levels): within 3%.
    assert abs(est - real) / real < 0.03, (est, real)


def test_estimate_memory_errors():
    with pytest.raises(ValueError, match="unknown index spec"):
        pyknn.estimate_memory(10, 8, "Fast")
    with pytest.raises(ValueError, match="n must be at least 0"):
        pyknn.estimate_memory(-1, 8, "Flat")
    with pytest.raises(ValueError, match="M must be at least 2"):
        pyknn.estimate_memory(10, 8, "HNSW1")


def test_evaluate_on_the_sample():
    s = pyknn.datasets.load_sample()
    base, q = s.base.astype(np.float32), s.queries[:300].astype(np.float32)
    flat = pyknn.FlatIndex(384, "ip")
    flat.add(base)
    r = pyknn.evaluate(flat, q, gt_ids=s.gt_ids[:300], qrels=s.qrels[:300], k=10)
    assert r["recall@10"] == pytest.approx(1.0)
    # Independent check of the relevance figures.
    assert r["ndcg@10"] == pytest.approx(pyknn.ndcg_at_k(r["ids"], s.qrels[:300], 10))
    assert 0.5 < r["mrr@10"] <= 1 and r["qps"] > 0 and r["nq"] == 300
    hnsw = pyknn.HNSWIndex(384, M=8, ef_construction=40)
    hnsw.add(base)
    lo = pyknn.evaluate(hnsw, q, gt_ids=s.gt_ids[:300], k=10, ef_search=10)
    hi = pyknn.evaluate(hnsw, q, base=base, k=10, ef_search=200)
    assert lo["recall@10"] < hi["recall@10"] and hi["params"] == {"ef_search": 200}
    assert lo["ndcg@10"] is None
    with pytest.raises(ValueError, match="gt_ids has 5 rows for 300 queries"):
        pyknn.evaluate(flat, q, gt_ids=s.gt_ids[:5])


def test_evaluate_names_metrics_by_k_and_checks_repeats():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    f = pyknn.FlatIndex(8)
    f.add(x)
    qrels = np.arange(5).reshape(5, 1)
    r = pyknn.evaluate(f, x[:5], base=x, qrels=qrels, k=3)
    assert {"recall@3", "ndcg@3", "mrr@3"} <= set(r) and "ndcg@10" not in r
    assert r["ndcg@3"] == pytest.approx(pyknn.ndcg_at_k(r["ids"], qrels, 3))
    assert r["mrr@3"] == pytest.approx(1.0) and r["ids"].shape == (5, 3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="repeats must be >= 1"):
            pyknn.evaluate(f, x[:5], base=x, k=3, repeats=bad)
    with pytest.raises(TypeError, match="repeats"):
        pyknn.evaluate(f, x[:5], base=x, k=3, repeats=2.5)
    assert pyknn.evaluate(f, x[:5], base=x, k=3, repeats=np.int64(2))["seconds"] >= 0
