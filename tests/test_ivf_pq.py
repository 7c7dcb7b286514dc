"""PQIndex / IVFPQIndex / RefineIndex: ADC accuracy, re-ranking, fast scan, storage, files."""
import pickle
import threading
import warnings

import numpy as np
import pytest

import pyknn
from pyknn import ground_truth

from conftest import clustered

METRICS = ["ip", "l2", "cosine"]
D = 32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _trained(metric="l2", n=3000, nlist=16, pq_m=8, nbits=8, by_residual=True,
             rerank_dtype="float32", ids=None, seed=0):
    x = clustered(n, D, n_clusters=24, seed=seed)
    idx = pyknn.IVFPQIndex(D, nlist=nlist, pq_m=pq_m, nbits=nbits, metric=metric,
                           by_residual=by_residual, rerank_dtype=rerank_dtype, nprobe=4)
    idx.train(x)
    idx.add(x, ids=ids)
    return idx, x


def _exact_to(q, v, metric):
    if metric == "cosine":
        q = _unit(q)
    q64, v64 = q.astype(np.float64), v.astype(np.float64)
    return ((q64 - v64) ** 2).sum(-1) if metric == "l2" else (q64 * v64).sum(-1)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nbits,pq_m", [(8, 8), (4, 16)])
@pytest.mark.parametrize("by_residual", [True, False])
def test_adc_equals_exact_distance_to_decoded(metric, nbits, pq_m, by_residual):
    idx, x = _trained(metric, nbits=nbits, pq_m=pq_m, by_residual=by_residual)
    q = clustered(20, D, n_clusters=24, seed=7)
    Dist, I = idx.search(q, 5, nprobe=16)
    rec = idx.reconstruct(I.ravel()).reshape(20, 5, D)
    ref = _exact_to(q[:, None, :], rec, metric)
    np.testing.assert_allclose(Dist, ref, rtol=1e-4, atol=1e-3)
    # Sorted best first by the same scores.
    assert (np.diff(Dist, axis=1) >= 0).all() if metric == "l2" else (np.diff(Dist, axis=1) <= 0).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nbits,pq_m", [(8, 8), (4, 16)])
def test_rerank_recall_close_to_one(simd_level, metric, nbits, pq_m):
    idx, x = _trained(metric, nbits=nbits, pq_m=pq_m)
    q = clustered(100, D, n_clusters=24, seed=99)
    Dr, Ir = ground_truth(x, q, 10, metric)
    Dist, I = idx.search(q, 10, nprobe=16, rerank=200)
    assert pyknn.recall_at_k(I, Ir, 10) >= 0.97
    # Re-ranked distances are exact for the ids returned.
    np.testing.assert_allclose(Dist, _exact_to(q[:, None, :], x[I] if metric != "cosine"
                                               else _unit(x)[I], metric), rtol=1e-4, atol=1e-4)
    plain = pyknn.recall_at_k(idx.search(q, 10, nprobe=16)[1], Ir, 10)
    assert plain < pyknn.recall_at_k(I, Ir, 10)


def test_every_simd_level_gives_the_same_results():
    results = {}
    for nbits, pq_m in [(8, 8), (4, 16)]:
        idx, x = _trained("ip", nbits=nbits, pq_m=pq_m)
        q = clustered(50, D, n_clusters=24, seed=4)
        previous = pyknn.simd_level()
        try:
            for level in pyknn.available_simd_levels():
                pyknn.set_simd_level(level)
                results[level] = idx.search(q, 10, nprobe=8)
        finally:
            pyknn.set_simd_level(previous)
        ref = results["scalar"]
        for level, (Dist, I) in results.items():
            # Same candidates; float sums may differ in the last bits between levels.
            assert (I == ref[1]).mean() > 0.99, level
            np.testing.assert_allclose(Dist, ref[0], rtol=1e-4, atol=1e-4)


def test_single_query_and_batch_paths_agree(threads):
    idx, x = _trained("l2", n=4000)
    q = clustered(64, D, n_clusters=24, seed=6)
    for rerank in (0, 30):
        Dist, I = idx.search(q, 7, nprobe=5, rerank=rerank)
        for i in (0, 13, 63):
            d1, i1 = idx.search(q[i], 7, nprobe=5, rerank=rerank)
            np.testing.assert_array_equal(i1[0], I[i])
            np.testing.assert_allclose(d1[0], Dist[i], rtol=1e-5, atol=1e-5)


def test_pq_index_scans_everything():
    x = clustered(2000, D, seed=2)
    q = clustered(30, D, seed=8)
    for nbits, pq_m in [(8, 8), (4, 16)]:
        idx = pyknn.PQIndex(D, pq_m=pq_m, nbits=nbits, metric="l2", rerank_dtype="float16")
        idx.train(x)
        idx.add(x)
        _, Ir = ground_truth(x, q, 10, "l2")
        assert pyknn.recall_at_k(idx.search(q, 10, rerank=300)[1], Ir, 10) >= 0.97
        Dist, I = idx.search(q, 5)
        np.testing.assert_allclose(Dist, _exact_to(q[:, None], idx.reconstruct(I.ravel())
                                                   .reshape(30, 5, D), "l2"), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(idx.get([3, 4]), x[[3, 4]], rtol=1e-3, atol=1e-3)  # float16


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"dim 30 is not divisible by pq_m 4 \(valid pq_m for "
                                         r"dim 30: 1, 2, 3, 5, 6, 10, 15, 30\)"):
        pyknn.IVFPQIndex(30, nlist=4, pq_m=4)
    with pytest.raises(ValueError, match=r"nbits 5 is not supported \(supported: 4, 8\)"):
        pyknn.IVFPQIndex(32, nlist=4, pq_m=4, nbits=5)
    with pytest.raises(ValueError, match="pq_m must be even, got 3"):
        pyknn.PQIndex(33, pq_m=3, nbits=4)
    with pytest.raises(ValueError, match="nlist must be at least 1"):
        pyknn.IVFPQIndex(32, nlist=0, pq_m=4)
    with pytest.raises(ValueError, match="rerank_dtype must be"):
        pyknn.IVFPQIndex(32, nlist=4, pq_m=4, rerank_dtype="int8")
    with pytest.raises(TypeError, match="needs pq_m"):
        pyknn.IVFPQIndex(32, nlist=4)
    with pytest.raises(ValueError, match="rerank=5 needs the full vectors"):
        pyknn.IVFPQIndex(32, nlist=4, pq_m=4, rerank=5)
    idx = pyknn.IVFPQIndex(8, nlist=50, pq_m=2)
    with pytest.raises(ValueError, match="got 20 points for nlist 50"):
        idx.train(np.random.default_rng(0).standard_normal((20, 8)))
    idx = pyknn.IVFPQIndex(8, nlist=2, pq_m=2, nbits=8)
    with pytest.raises(ValueError, match=r"2\*\*nbits = 256 points, got 100"):
        idx.train(np.random.default_rng(0).standard_normal((100, 8)))
    assert not idx.is_trained
    with pytest.raises(ValueError, match="already holds"):
        _trained("l2", n=500, nlist=4)[0].train(clustered(500, D))


def test_rerank_without_vectors_raises():
    idx, x = _trained("ip", n=600, nlist=4, rerank_dtype=None)
    with pytest.raises(ValueError, match=r"rerank=10 needs the full vectors.*rerank_dtype="):
        idx.search(x[:2], 3, rerank=10)
    with pytest.raises(ValueError, match="reconstruct"):
        idx.get([1])
    assert idx.reconstruct(1).shape == (D,)


def test_untrained_use_raises(tmp_path):
    for idx in (pyknn.IVFPQIndex(8, nlist=4, pq_m=2), pyknn.PQIndex(8, pq_m=2, nbits=4)):
        name = type(idx).__name__
        with pytest.raises(RuntimeError, match=rf"{name} is not trained: call train\(x\) before add"):
            idx.add(np.ones((3, 8)))
        with pytest.raises(RuntimeError, match=r"not trained: call train\(x\) before search"):
            idx.search(np.ones(8), 1)
        idx.save(tmp_path / "u")
        for restored in (pickle.loads(pickle.dumps(idx)), pyknn.load(tmp_path / "u")):
            assert not restored.is_trained
            with pytest.raises(RuntimeError, match="not trained"):
                restored.search(np.ones(8), 1)
            with pytest.raises(RuntimeError, match="not trained"):
                restored.add(np.ones((1, 8)))


@pytest.mark.parametrize("nbits,pq_m", [(8, 8), (4, 16)])
def test_storage_by_id_and_filters(nbits, pq_m):
    ids = np.arange(3000) * 5 + 1
    idx, x = _trained("l2", ids=ids, nbits=nbits, pq_m=pq_m)
    assert len(idx) == 3000 and sorted(idx.ids.tolist()) == ids.tolist()
    assert idx.list_sizes().sum() == 3000
    np.testing.assert_array_equal(idx.get(ids[[3, 2999]]), x[[3, 2999]])
    codes_before = idx.codes(ids[100:400])
    rec_before = idx.reconstruct(ids[100:400])
    assert idx.remove(ids[:100]) == 100 and len(idx) == 2900
    # Moving vectors inside their lists keeps their codes and stored vectors.
    np.testing.assert_array_equal(idx.codes(ids[100:400]), codes_before)
    np.testing.assert_array_equal(idx.reconstruct(ids[100:400]), rec_before)
    np.testing.assert_array_equal(idx.get(ids[100:400]), x[100:400])
    with pytest.raises(KeyError, match=f"id {ids[0]} is not in the index"):
        idx.get([ids[0]])
    assert not idx.contains(ids[0]) and ids[0] not in idx and ids[200] in idx
    _, I = idx.search(x[:100], 5, nprobe=16)
    assert not np.isin(I, ids[:100]).any()
    idx.add(x[:1], ids=ids[:1])
    assert idx.search(x[0], 1, nprobe=16, rerank=50)[1][0, 0] == ids[0]
    allowed = ids[500:520]
    Dist, I = idx.search(x[:30], 10, nprobe=16, rerank=50, filter=allowed)
    assert np.isin(I[I >= 0], allowed).all()
    _, Ir = ground_truth(x[500:520], x[:30], 10, "l2")
    np.testing.assert_array_equal(I, allowed[Ir])
    mask = np.isin(idx.ids, allowed)
    np.testing.assert_array_equal(idx.search(x[:30], 10, nprobe=16, rerank=50, filter=mask)[1], I)
    Dist, I = idx.search(x[0], 4, nprobe=16, filter=[ids[700]])
    assert I.tolist()[0][1:] == [-1, -1, -1] and I[0, 0] == ids[700]
    assert np.isposinf(Dist[0, 1:]).all()


def test_input_policy_applies():
    idx, x = _trained("cosine", n=800, nlist=8)
    with pytest.raises(ValueError, match="expected dim 32, got 31"):
        idx.search(np.ones(31), 1)
    with pytest.raises(ValueError, match="expected dim 32, got 31"):
        idx.add(np.ones((2, 31)))
    bad = x[:10].copy()
    bad[4] = 0
    with pytest.raises(ValueError, match="row 4 is a zero vector"):
        idx.add(bad)
    bad = x[:10].copy()
    bad[6, 1] = np.nan
    with pytest.raises(ValueError, match="row 6 contains NaN"):
        idx.add(bad)
    with pytest.raises(ValueError, match="row 6 contains NaN"):
        idx.search(bad, 1)
    with pytest.raises(ValueError, match="id 3 .* already in the index"):
        idx.add(x[:1], ids=[3])
    with pytest.raises(ValueError, match="id -1 .* reserved"):
        idx.add(x[:1], ids=[-1])
    with pytest.raises(TypeError, match="real numbers"):
        idx.add(np.array([["x"] * 32]))
    with pytest.raises(ValueError, match="k must be at least 1"):
        idx.search(x[:1], 0)
    with pytest.raises(ValueError, match="rerank must be at least 0"):
        idx.search(x[:1], 1, rerank=-1)
    assert len(idx) == 800
    Dist, I = idx.search(x[:3], 1000, nprobe=8)
    assert (I[:, 800:] == -1).all() and np.isneginf(Dist[:, 800:]).all()
    # Other dtypes and layouts give the same answers.
    a = idx.search(x[:5], 3)
    for variant in (x[:5].astype(np.float64), np.asfortranarray(x[:5])):
        np.testing.assert_array_equal(idx.search(variant, 3)[1], a[1])
    f16 = pyknn.IVFPQIndex(D, nlist=4, pq_m=8, rerank_dtype="float16")
    f16.train(x)
    with pytest.raises(ValueError, match="row 1 has a value beyond the float16 range"):
        f16.add(np.stack([x[0], x[1] * 1e5]))
    assert len(f16) == 0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nbits,pq_m,rerank_dtype", [(8, 8, "float32"), (4, 16, "float16"),
                                                     (8, 4, None)])
def test_save_load_identical(tmp_path, metric, nbits, pq_m, rerank_dtype):
    idx, x = _trained(metric, n=1500, nlist=16, ids=np.arange(1500) * 3, nbits=nbits,
                      pq_m=pq_m, rerank_dtype=rerank_dtype)
    idx.remove([0, 3, 6])
    idx.nprobe = 3
    path = tmp_path / "ivfpq.pyknn"
    idx.save(path)
    loaded = pyknn.load(path)
    assert type(loaded) is pyknn.IVFPQIndex
    assert (loaded.nlist, loaded.nprobe, loaded.metric, len(loaded), loaded.pq_m, loaded.nbits,
            loaded.rerank_dtype) == (16, 3, metric, 1497, pq_m, nbits, rerank_dtype)
    rerank = 20 if rerank_dtype else 0
    for clone in (loaded, pickle.loads(pickle.dumps(idx))):
        for a, b in zip(clone.search(x[:50], 5, rerank=rerank), idx.search(x[:50], 5, rerank=rerank)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(clone.centroids, idx.centroids)
        np.testing.assert_array_equal(clone.pq_centroids, idx.pq_centroids)
        np.testing.assert_array_equal(clone.codes(idx.ids), idx.codes(idx.ids))


def test_corrupted_file(tmp_path):
    idx, _ = _trained("l2", n=500, nlist=4, nbits=4, pq_m=8)
    path = tmp_path / "ivfpq.pyknn"
    idx.save(path)
    data = path.read_bytes()
    for cut in (60, 100, 300, len(data) // 2, len(data) - 3):
        bad = tmp_path / "bad.pyknn"
        bad.write_bytes(data[:cut])
        with pytest.raises(pyknn.FormatError):
            pyknn.load(bad)


def test_memory_usage_counts_code_bytes_exactly():
    # PQIndex with one list: its quantizer holds 2**nbits * dim floats whatever pq_m (plus
    # pq_m * 2**nbits centroid norms), so two indexes that differ only in pq_m differ by exactly
    # n * (difference in code bytes) plus the norms.
    x = clustered(32 * 40, D, seed=5)
    for nbits in (8, 4):
        sizes = {}
        for pq_m in (8, 16):
            idx = pyknn.PQIndex(D, pq_m=pq_m, nbits=nbits)
            idx.train(x)
            empty = idx.memory_usage()
            idx.add(x)
            sizes[pq_m] = idx.memory_usage()
            assert idx.code_size == pq_m * nbits // 8
            assert sizes[pq_m] - empty >= len(x) * (idx.code_size + 8)
        assert sizes[16] - sizes[8] == len(x) * 8 * nbits // 8 + 8 * 2 ** nbits * 4
    # Re-rank vectors: exactly dim * 4 (float32) or dim * 2 (float16) bytes more per vector.
    mem = {}
    for dtype in (None, "float16", "float32"):
        idx = pyknn.IVFPQIndex(D, nlist=8, pq_m=8, rerank_dtype=dtype)
        idx.train(x)
        idx.add(x)
        mem[dtype] = idx.memory_usage()
    assert mem["float16"] - mem[None] == len(x) * D * 2
    assert mem["float32"] - mem[None] == len(x) * D * 4


def test_refine_index_over_any_index():
    x = clustered(3000, D, n_clusters=24, seed=1)
    q = clustered(50, D, n_clusters=24, seed=11)
    _, Ir = ground_truth(x, q, 10, "ip")
    bases = [pyknn.IVFPQIndex(D, nlist=16, pq_m=16, nbits=4, nprobe=16),
             pyknn.PQIndex(D, pq_m=8), pyknn.HNSWIndex(D, M=8, ef_construction=40)]
    for base in bases:
        r = pyknn.RefineIndex(base, k_factor=20)
        if hasattr(base, "train"):
            r.train(x)
        r.add(x, ids=np.arange(3000) + 100)
        Dist, I = r.search(q, 10)
        assert pyknn.recall_at_k(I - 100, Ir, 10) >= 0.95, type(base).__name__
        np.testing.assert_allclose(Dist, (q[:, None, :] * x[I - 100]).sum(-1), rtol=1e-4, atol=1e-4)
        assert len(r) == 3000 and r.memory_usage() > base.memory_usage() + 3000 * D * 4
        assert r.remove([100, 101]) == 2 and 100 not in r and len(base) == 2998
        allowed = np.arange(500, 520) + 100
        _, I = r.search(q[:5], 5, filter=allowed)
        assert np.isin(I[I >= 0], allowed).all()
        clone = pickle.loads(pickle.dumps(r))
        np.testing.assert_array_equal(clone.search(q, 10)[1], r.search(q, 10)[1])
    # Default ids continue in both parts; a failed add changes neither.
    r = pyknn.RefineIndex(pyknn.PQIndex(D, pq_m=8).train(x))
    r.add(x[:10])
    r.add(x[10:20])
    assert sorted(r.ids.tolist()) == list(range(20)) == sorted(r.base.ids.tolist())
    with pytest.raises(ValueError, match="already in the index"):
        r.add(x[:2], ids=[50, 5])
    assert len(r) == 20 and len(r.base) == 20
    with pytest.raises(RuntimeError, match="not trained"):
        pyknn.RefineIndex(pyknn.IVFPQIndex(D, nlist=4, pq_m=8)).add(x[:2])
    # A failed add does not use up default ids; unknown ids in remove change neither part.
    with pytest.raises(ValueError, match="NaN"):
        r.add(np.full((3, D), np.nan, np.float32))
    r.add(x[20:21])
    assert 20 in r and 20 in r.base
    with pytest.raises(KeyError):
        r.remove([3, 999])
    assert 3 in r and 3 in r.base and len(r) == len(r.base) == 21
    # Bases without training: train() is a no-op, as in FAISS.
    h = pyknn.RefineIndex(pyknn.HNSWIndex(D, M=8))
    assert h.train(x) is h and h.is_trained and len(h) == 0


def test_refine_index_guard_and_limits():
    x = _unit(clustered(600, D, n_clusters=8, seed=3))
    r = pyknn.RefineIndex(pyknn.FlatIndex(D))
    r.add(x[:100], model_id="m@1")
    assert r.model_id == "m@1" and r.base.metadata["model_id"] == "m@1"
    with pytest.raises(pyknn.ModelMismatchError):
        r.search(x[:1], 5, model_id="other@1")
    with pytest.warns(pyknn.NormWarning):
        r.add(x[100:110] * 3)
    with pytest.raises(ValueError, match="rerank=.* results"):
        r.search(x[:4], 5, rerank=1 << 27)
    with pytest.raises(ValueError, match="k=.* results"):
        r.search(x[:1], 1 << 29)
    clone = pickle.loads(pickle.dumps(r))
    assert clone.model_id == "m@1" and len(clone) == 110


def test_refine_index_concurrent_adds_keep_parts_in_step():
    x = clustered(4000, D, n_clusters=24, seed=5)
    r = pyknn.RefineIndex(pyknn.PQIndex(D, pq_m=8, metric="l2").train(x), k_factor=8)
    errors, snapshots = [], []

    def writer(t):
        try:
            for i in range(10):
                r.add(x[(t * 10 + i) * 40:(t * 10 + i + 1) * 40])
                if i % 3 == 0:
                    snapshots.append(pickle.dumps(r))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(r) == len(r.base) == 1600
    assert sorted(r.ids.tolist()) == sorted(r.base.ids.tolist()) == list(range(1600))
    for blob in snapshots:
        c = pickle.loads(blob)
        assert sorted(c.ids.tolist()) == sorted(c.base.ids.tolist())


def test_untrained_add_raises_before_norm_warning():
    idx = pyknn.IVFPQIndex(D, nlist=4, pq_m=8, metric="ip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="not trained"):
            idx.add(np.full((2, D), 3.0, np.float32))


def test_concurrent_searches_and_adds():
    x = clustered(4000, D, n_clusters=24, seed=12)
    idx = pyknn.IVFPQIndex(D, nlist=16, pq_m=8, metric="l2", nprobe=4, rerank_dtype="float32")
    idx.train(x[:3000])
    idx.add(x[:1000])
    errors = []

    def searcher():
        try:
            for _ in range(20):
                _, I = idx.search(x[:40], 5, rerank=20)
                assert ((I >= -1) & (I < 4000)).all() and (I[:, 0] >= 0).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer():
        try:
            for i in range(1000, 4000, 250):
                idx.add(x[i:i + 250])
                idx.remove([i], missing_ok=True)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(idx) == 4000 - 12


def test_fast_scan_sums_never_overflow_uint16():
    # 512 sub-quantizers whose table entries all round up: the quantised sums must still fit in
    # 16 bits, or the best vector's sum wraps around to a small one and is lost.
    rng = np.random.default_rng(0)
    d = 512
    x = rng.integers(0, 16, (2000, d)).astype(np.float32)
    x[0] = 15.0  # the best inner product with the all-ones query: 7680
    idx = pyknn.IVFPQIndex(d, nlist=1, pq_m=d, nbits=4, metric="ip", by_residual=False)
    idx.train(x)
    idx.add(x)
    D, I = idx.search(np.ones(d, np.float32), 5, nprobe=1)
    assert I[0, 0] == 0 and D[0, 0] == pytest.approx(7680, rel=1e-4)
