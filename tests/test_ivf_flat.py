"""IVFFlatIndex: recall against exact search, nprobe behaviour, training rules, storage, files."""
import pickle

import numpy as np
import pytest

import pyknn
from pyknn import ground_truth

from conftest import clustered

METRICS = ["ip", "l2", "cosine"]


def _trained(metric="l2", n=3000, d=32, nlist=32, seed=0, ids=None):
    x = clustered(n, d, n_clusters=24, seed=seed)
    idx = pyknn.IVFFlatIndex(d, nlist=nlist, metric=metric, nprobe=4)
    idx.train(x)
    idx.add(x, ids=ids)
    return idx, x


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 5, 200])
def test_exhaustive_probe_is_exact(simd_level, threads, metric, nq):
    idx, x = _trained(metric)
    q = clustered(nq, 32, n_clusters=24, seed=99)
    D, I = idx.search(q, 10, nprobe=idx.nlist)
    Dr, Ir = ground_truth(x, q, 10, metric)
    assert pyknn.recall_at_k(I, Ir, 10) == 1.0
    np.testing.assert_allclose(D, Dr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_recall_non_decreasing_in_nprobe(metric):
    idx, x = _trained(metric, n=5000, nlist=64)
    q = clustered(300, 32, n_clusters=24, seed=5)
    _, Ir = ground_truth(x, q, 10, metric)
    recalls = [pyknn.recall_at_k(idx.search(q, 10, nprobe=p)[1], Ir, 10) for p in (1, 2, 4, 8, 16, 64)]
    assert all(b >= a for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[-1] == 1.0 and recalls[0] < 1.0


def test_batch_and_single_query_paths_agree():
    idx, x = _trained("l2", n=4000, nlist=16)
    q = clustered(64, 32, n_clusters=24, seed=6)
    D, I = idx.search(q, 7, nprobe=5)
    for i in (0, 13, 63):
        d1, i1 = idx.search(q[i], 7, nprobe=5)
        np.testing.assert_array_equal(i1[0], I[i])
        np.testing.assert_allclose(d1[0], D[i], rtol=1e-5, atol=1e-5)


def test_nprobe_clamped_and_default():
    idx, x = _trained("ip", nlist=8)
    a = idx.search(x[:5], 3, nprobe=1000)
    b = idx.search(x[:5], 3, nprobe=8)
    np.testing.assert_array_equal(a[1], b[1])
    idx.nprobe = 8
    np.testing.assert_array_equal(idx.search(x[:5], 3)[1], b[1])
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        idx.search(x[:5], 3, nprobe=0)
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        idx.nprobe = 0


def test_untrained_use_raises():
    idx = pyknn.IVFFlatIndex(8, nlist=4)
    assert not idx.is_trained
    with pytest.raises(RuntimeError, match=r"not trained: call train\(x\) before add"):
        idx.add(np.ones((3, 8)))
    with pytest.raises(RuntimeError, match=r"not trained: call train\(x\) before search"):
        idx.search(np.ones(8), 1)
    restored = pickle.loads(pickle.dumps(idx))
    assert not restored.is_trained
    with pytest.raises(RuntimeError, match="not trained"):
        restored.search(np.ones(8), 1)


def test_training_rules():
    idx = pyknn.IVFFlatIndex(8, nlist=50)
    with pytest.raises(ValueError, match="got 20 points for nlist 50"):
        idx.train(np.random.default_rng(0).standard_normal((20, 8)))
    x = clustered(500, 8, seed=1)
    x[123, 3] = np.inf
    with pytest.raises(ValueError, match="row 123 contains Inf"):
        idx.train(x)
    assert not idx.is_trained
    idx2, x2 = _trained("l2", n=1000, d=32, nlist=8)
    with pytest.raises(ValueError, match="already holds 1000 vectors"):
        idx2.train(x2)
    with pytest.raises(ValueError, match="nlist must be at least 1"):
        pyknn.IVFFlatIndex(8, nlist=0)


def test_storage_by_id_and_filters():
    ids = np.arange(3000) * 5 + 1
    idx, x = _trained("l2", ids=ids)
    assert len(idx) == 3000 and sorted(idx.ids.tolist()) == ids.tolist()
    assert idx.list_sizes().sum() == 3000
    np.testing.assert_array_equal(idx.get(ids[[3, 2999]]), x[[3, 2999]])
    assert idx.remove(ids[:100]) == 100 and len(idx) == 2900
    with pytest.raises(KeyError, match=f"id {ids[0]} is not in the index"):
        idx.get([ids[0]])
    D, I = idx.search(x[:100], 5, nprobe=32)
    assert not np.isin(I, ids[:100]).any()
    idx.add(x[:1], ids=ids[:1])
    assert idx.search(x[0], 1, nprobe=32)[1][0, 0] == ids[0]
    # Filters: allow-list and boolean mask over idx.ids agree and are respected.
    allowed = ids[500:520]
    D, I = idx.search(x[:30], 10, nprobe=32, filter=allowed)
    assert np.isin(I[I >= 0], allowed).all()
    _, Ir = ground_truth(x[500:520], x[:30], 10, "l2")
    np.testing.assert_array_equal(I, allowed[Ir])
    mask = np.isin(idx.ids, allowed)
    np.testing.assert_array_equal(idx.search(x[:30], 10, nprobe=32, filter=mask)[1], I)
    D, I = idx.search(x[0], 4, nprobe=32, filter=[ids[700]])
    assert I.tolist() == [[ids[700], -1, -1, -1]] and np.isposinf(D[0, 1:]).all()


def test_input_policy_applies():
    idx, x = _trained("cosine", n=800, nlist=8)
    with pytest.raises(ValueError, match="expected dim 32, got 31"):
        idx.search(np.ones(31), 1)
    bad = x[:10].copy()
    bad[4] = 0
    with pytest.raises(ValueError, match="row 4 is a zero vector"):
        idx.add(bad)
    with pytest.raises(ValueError, match="id 3 .* already in the index"):
        idx.add(x[:1], ids=[3])
    assert len(idx) == 800
    D, I = idx.search(x[:3], 1000, nprobe=8)
    assert (I[:, 800:] == -1).all() and np.isneginf(D[:, 800:]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_save_load_identical(tmp_path, metric):
    idx, x = _trained(metric, n=1500, nlist=16, ids=np.arange(1500) * 3)
    idx.remove([0, 3, 6])
    idx.nprobe = 3
    path = tmp_path / "ivf.pyknn"
    idx.save(path)
    loaded = pyknn.load(path)
    assert type(loaded) is pyknn.IVFFlatIndex
    assert (loaded.nlist, loaded.nprobe, loaded.metric, len(loaded)) == (16, 3, metric, 1497)
    for a, b in zip(loaded.search(x[:50], 5), idx.search(x[:50], 5)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.centroids, idx.centroids)
    clone = pickle.loads(pickle.dumps(idx))
    np.testing.assert_array_equal(clone.search(x[:50], 5)[1], idx.search(x[:50], 5)[1])


def test_corrupted_ivf_file(tmp_path):
    idx, _ = _trained("l2", n=500, nlist=4)
    path = tmp_path / "ivf.pyknn"
    idx.save(path)
    data = path.read_bytes()
    for cut in (60, 100, len(data) // 2, len(data) - 3):
        bad = tmp_path / "bad.pyknn"
        bad.write_bytes(data[:cut])
        with pytest.raises(pyknn.FormatError):
            pyknn.load(bad)


def test_deterministic_training():
    x = clustered(3000, 16, seed=3)
    a = pyknn.IVFFlatIndex(16, nlist=20).train(x, seed=4)
    b = pyknn.IVFFlatIndex(16, nlist=20).train(x, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_concurrent_searches_and_adds():
    import threading
    x = clustered(6000, 32, n_clusters=24, seed=12)
    idx = pyknn.IVFFlatIndex(32, nlist=16, metric="l2", nprobe=4)
    idx.train(x[:3000])
    idx.add(x[:1000])
    errors = []

    def searcher():
        try:
            for _ in range(30):
                before = len(idx)
                _, I = idx.search(x[:40], 5)
                # Every id returned was added (ids are 0..n-1 in order of addition).
                assert ((I >= -1) & (I < 6000)).all()
                assert (I[:, 0] >= 0).all() and before >= 1000
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer():
        try:
            for i in range(1000, 6000, 250):
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
    assert len(idx) == 6000 - 20
    _, I = idx.search(x[:50], 1, nprobe=16)
    exact = pyknn.FlatIndex(32, "l2")
    exact.add(x)
    exact.remove(list(range(1000, 6000, 250)))
    np.testing.assert_array_equal(I, exact.search(x[:50], 1)[1])


def test_magnitude_limits_and_nprobe_persisted(tmp_path):
    idx, x = _trained("l2", n=500, nlist=4)
    with pytest.raises(ValueError, match="squared norm"):
        idx.add(x[:8] * 1e20)
    assert len(idx) == 500
    idx.nprobe = 3
    idx.metadata.clear()  # user metadata is independent of search parameters
    assert idx.nprobe == 3
    idx.save(tmp_path / "i")
    assert pyknn.load(tmp_path / "i").nprobe == 3
    with pytest.raises(ValueError, match="nprobe must be at most"):
        idx.search(x[0], 1, nprobe=2**64)
    with pytest.raises(ValueError, match="nlist must be at most"):
        pyknn.IVFFlatIndex(8, nlist=2**64)
