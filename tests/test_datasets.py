"""Dataset loaders, the bundled sample, and evaluation.ground_truth against brute force."""

import json
import math

import numpy as np
import pytest

from pyknn.datasets import (Dataset, load, load_ann_benchmarks_hdf5, load_npy_folder, load_sample,
                            read_bvecs, read_fvecs, read_ivecs, sample_path, write_bvecs,
                            write_fvecs, write_ivecs)
from pyknn.evaluation import ground_truth, mrr_at_k, recall_at_k


# --------------------------------------------------------------------------- TEXMEX
@pytest.mark.parametrize("write, read, make", [
    (write_fvecs, read_fvecs, lambda r: r.standard_normal((17, 5)).astype(np.float32)),
    (write_ivecs, read_ivecs, lambda r: r.integers(-2**31, 2**31 - 1, (9, 100)).astype(np.int32)),
    (write_bvecs, read_bvecs, lambda r: r.integers(0, 256, (33, 128)).astype(np.uint8)),
])
def test_vecs_round_trip(tmp_path, write, read, make):
    x = make(np.random.default_rng(0))
    path = tmp_path / "x.vecs"
    write(path, x)
    itemsize = x.dtype.itemsize
    assert path.stat().st_size == x.shape[0] * (4 + x.shape[1] * itemsize)
    y = read(path)
    assert y.dtype == x.dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x)
    # Files written independently (the TEXMEX layout by hand) read the same.
    by_hand = tmp_path / "hand.vecs"
    with open(by_hand, "wb") as f:
        for row in x:
            f.write(np.int32(x.shape[1]).tobytes() + row.astype(x.dtype.newbyteorder("<")).tobytes())
    np.testing.assert_array_equal(read(by_hand), x)


def test_vecs_empty_file(tmp_path):
    (tmp_path / "e.fvecs").write_bytes(b"")
    assert read_fvecs(tmp_path / "e.fvecs").shape == (0, 0)


def test_vecs_broken_files(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    good = tmp_path / "g.fvecs"
    write_fvecs(good, x)
    data = good.read_bytes()

    truncated = tmp_path / "t.fvecs"
    truncated.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="not a multiple of the record size"):
        read_fvecs(truncated)

    mixed = tmp_path / "m.fvecs"  # second record claims dim 3: the sizes still add up to 3 x 20
    b = bytearray(data)
    b[20:24] = np.int32(3).tobytes()
    mixed.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="record 1 has dimension 3"):
        read_fvecs(mixed)

    zero = tmp_path / "z.fvecs"
    zero.write_bytes(np.int32(0).tobytes() * 4)
    with pytest.raises(ValueError, match="invalid dimension"):
        read_fvecs(zero)

    tiny = tmp_path / "tiny.ivecs"
    tiny.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="too short"):
        read_ivecs(tiny)

    # An fvecs file read as bvecs does not fit the bvecs record size.
    with pytest.raises(ValueError):
        read_bvecs(good)

    with pytest.raises(ValueError, match="2-D"):
        write_fvecs(tmp_path / "bad.fvecs", np.zeros(3))


# --------------------------------------------------------------------------- HDF5
def _write_hdf5(path, distance, with_neighbors=True):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    train = rng.standard_normal((50, 8)).astype(np.float32)
    test = rng.standard_normal((6, 8)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.attrs["type"] = "dense"
        f.create_dataset("train", data=train)
        f.create_dataset("test", data=test)
        if with_neighbors:
            f.create_dataset("neighbors", data=rng.integers(0, 50, (6, 10)).astype(np.int32))
            f.create_dataset("distances", data=rng.random((6, 10)).astype(np.float32))
    return train, test


@pytest.mark.parametrize("distance, metric", [("angular", "cosine"), ("euclidean", "l2"),
                                              ("dot", "ip"), ("ip", "ip")])
def test_hdf5_round_trip(tmp_path, distance, metric):
    path = tmp_path / f"toy-8-{distance}.hdf5"
    train, test = _write_hdf5(path, distance)
    for ds in (load_ann_benchmarks_hdf5(path), load(path), load(str(path))):
        assert ds.metric == metric and ds.name == f"toy-8-{distance}"
        np.testing.assert_array_equal(ds.base, train)
        np.testing.assert_array_equal(ds.queries, test)
        assert ds.gt_ids.dtype == np.int64 and ds.gt_ids.shape == (6, 10)
        assert ds.qrels is None and ds.dim == 8


def test_hdf5_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "jaccard.hdf5"
    _write_hdf5(path, "jaccard")
    with pytest.raises(ValueError, match="unsupported distance"):
        load_ann_benchmarks_hdf5(path)
    path = tmp_path / "no-gt.h5"
    _write_hdf5(path, "euclidean", with_neighbors=False)
    assert load(path).gt_ids is None
    path = tmp_path / "no-train.h5"
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("test", data=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="no 'train'"):
        load_ann_benchmarks_hdf5(path)


# --------------------------------------------------------------------------- npy folders
def _npy_folder(tmp_path, dtype=np.float16):
    rng = np.random.default_rng(2)
    folder = tmp_path / "toy"
    folder.mkdir()
    base = rng.standard_normal((40, 6)).astype(dtype)
    queries = rng.standard_normal((5, 6)).astype(dtype)
    suffix = "f16" if dtype == np.float16 else "f32"
    np.save(folder / f"base.{suffix}.npy", base)
    np.save(folder / f"queries.{suffix}.npy", queries)
    np.save(folder / "gt_ids.i32.npy", ground_truth(base, queries, 7)[1].astype(np.int32))
    np.save(folder / "qrels.i32.npy", rng.integers(0, 40, 5).astype(np.int32))
    return folder, base, queries


def test_npy_folder(tmp_path):
    folder, base, queries = _npy_folder(tmp_path)
    ds = load_npy_folder(folder)
    assert ds.name == "toy" and ds.metric == "ip" and ds.dim == 6
    assert ds.base.dtype == np.float16  # kept as stored
    np.testing.assert_array_equal(ds.base, base)
    np.testing.assert_array_equal(ds.queries, queries)
    assert ds.base_f32().dtype == np.float32 and ds.queries_f32().dtype == np.float32
    assert ds.gt_ids.dtype == np.int64 and ds.gt_ids.shape == (5, 7)
    assert ds.qrels.dtype == np.int64 and ds.qrels.shape == (5,)
    text = repr(ds)
    assert "toy" in text and "(40, 6)" in text and "(5, 6)" in text and "(5, 7)" in text
    assert load(folder).name == "toy" and load(str(folder)).base.shape == (40, 6)
    mm = load_npy_folder(folder, mmap=True)
    assert isinstance(mm.base, np.memmap)
    np.testing.assert_array_equal(mm.base, base)
    with pytest.raises(FileNotFoundError):
        ds.doc_texts()


def test_npy_folder_metric_override_and_f32(tmp_path):
    folder, base, _ = _npy_folder(tmp_path, np.float32)
    assert load_npy_folder(folder).base.dtype == np.float32
    (folder / "info.json").write_text(json.dumps({"metric": "cosine"}))
    assert load_npy_folder(folder).metric == "cosine"
    (folder / "metric.txt").write_text("l2\n")  # metric.txt wins over info.json
    assert load_npy_folder(folder).metric == "l2"
    (folder / "metric.txt").write_text("hamming")
    with pytest.raises(ValueError, match="metric"):
        load_npy_folder(folder)


def test_npy_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npy_folder(tmp_path / "missing")
    folder, _, _ = _npy_folder(tmp_path)
    np.save(folder / "qrels.i32.npy", np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="qrels has 4 rows"):
        load_npy_folder(folder)
    (folder / "base.f16.npy").unlink()
    with pytest.raises(FileNotFoundError, match="base"):
        load_npy_folder(folder)
    np.save(folder / "base.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="dim"):
        load_npy_folder(folder)


def test_load_dispatch_errors(tmp_path):
    f = tmp_path / "x.fvecs"
    write_fvecs(f, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="supported"):
        load(f)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.hdf5")


def test_dataset_validation():
    with pytest.raises(ValueError, match="2-D"):
        Dataset("x", np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="metric"):
        Dataset("x", np.zeros((2, 3)), np.zeros((1, 3)), metric="dot")
    with pytest.raises(ValueError, match="gt_ids has 2 rows"):
        Dataset("x", np.zeros((2, 3)), np.zeros((1, 3)), gt_ids=np.zeros((2, 1), np.int64))
    ds = Dataset("x", np.zeros((2, 3), np.float64), np.zeros((1, 3), np.uint8))
    assert ds.base.dtype == np.float32 and ds.queries.dtype == np.float32


# --------------------------------------------------------------------------- bundled sample
def test_bundled_sample():
    assert sample_path().is_dir()
    ds = load_sample()
    n, nq = 10_000, 1_000
    assert ds.name == "wordnet-minilm-sample" and ds.metric == "ip" and ds.dim == 384
    assert ds.base.shape == (n, 384) and ds.base.dtype == np.float16
    assert ds.queries.shape == (nq, 384) and ds.queries.dtype == np.float16
    assert ds.gt_ids.shape == (nq, 100) and ds.qrels.shape == (nq,)
    assert ((ds.qrels >= 0) & (ds.qrels < n)).all()
    norms = np.linalg.norm(ds.base_f32(), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)
    # The shipped ground truth is exact search on the shipped vectors.
    D, I = ground_truth(ds.base, ds.queries, 100, "ip")
    np.testing.assert_array_equal(I, ds.gt_ids)
    assert (np.diff(D, axis=1) <= 0).all()
    # The judged document is usually near the top (a sanity check on the qrels remapping).
    assert recall_at_k(ds.gt_ids, ds.qrels[:, None], 10) > 0.8
    assert mrr_at_k(ds.gt_ids, ds.qrels, 100) > 0.5
    docs, queries = ds.doc_texts(), ds.query_texts()
    assert len(docs) == n and len(queries) == nq and all(isinstance(t, str) for t in queries)
    assert load().name == ds.name


# --------------------------------------------------------------------------- ground truth
def _brute_force(base, queries, k, metric):
    """Per-pair loop with exactly rounded sums (math.fsum); ties to the smaller id."""
    B = np.asarray(base, np.float64)
    Q = np.atleast_2d(np.asarray(queries, np.float64))
    ids, dists = [], []
    for q in Q:
        scored = []
        for i, b in enumerate(B):
            if metric == "l2":
                s = -math.fsum((q - b) ** 2)
            elif metric == "ip":
                s = math.fsum(q * b)
            else:
                s = math.fsum(q * b) / (math.sqrt(math.fsum(q * q)) * math.sqrt(math.fsum(b * b)))
            scored.append((-s, i))
        scored.sort()
        top = scored[:k]
        pad = math.inf if metric == "l2" else -math.inf
        ids.append([i for _, i in top] + [-1] * (k - len(top)))
        dists.append([(s if metric == "l2" else -s) for s, _ in top] + [pad] * (k - len(top)))
    return np.array(dists), np.array(ids, np.int64)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("budget", [256 << 20, 1])  # 1 -> the 1 MiB floor: many blocks
def test_ground_truth_exact_ties(metric, budget):
    # Small integers: every float64 score is exact, so ties are real and many.
    rng = np.random.default_rng(5)
    base = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)
    base[100:110] = base[:10]  # exact duplicates too
    queries = rng.integers(-2, 3, size=(25, 4)).astype(np.float32)
    k = 20
    D, I = ground_truth(base, queries, k, metric, memory_budget=budget)
    wantD, wantI = _brute_force(base, queries, k, metric)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (25, k)
    np.testing.assert_array_equal(I, wantI)
    np.testing.assert_array_equal(D, wantD.astype(np.float32))


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ground_truth_random(metric, dtype):
    rng = np.random.default_rng(6)
    base = rng.standard_normal((200, 24)).astype(dtype)
    base[150:160] = base[20:30]  # duplicates: identical scores, smaller id first
    queries = rng.standard_normal((15, 24)).astype(dtype)
    D, I = ground_truth(base, queries, 30, metric)
    wantD, wantI = _brute_force(base, queries, 30, metric)
    np.testing.assert_array_equal(I, wantI)
    np.testing.assert_allclose(D, wantD, rtol=1e-6, atol=1e-6)
    assert ((I[:, :-1] < I[:, 1:]) | (D[:, :-1] != D[:, 1:])).all()


def test_ground_truth_chunked_base_matches_cached():
    # A budget too small to cache the base forces per-block conversion of base chunks.
    rng = np.random.default_rng(8)
    base = rng.standard_normal((3000, 200)).astype(np.float16)
    queries = rng.standard_normal((40, 200)).astype(np.float16)
    for metric in ("ip", "l2", "cosine"):
        a = ground_truth(base, queries, 15, metric)
        b = ground_truth(base, queries, 15, metric, memory_budget=1)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("metric, pad", [("ip", -np.inf), ("cosine", -np.inf), ("l2", np.inf)])
def test_ground_truth_k_larger_than_n(metric, pad):
    rng = np.random.default_rng(9)
    base = rng.standard_normal((4, 3))
    q = rng.standard_normal(3)  # 1-D: one query
    D, I = ground_truth(base, q, 7, metric)
    wantD, wantI = _brute_force(base, q, 7, metric)
    assert D.shape == (1, 7)
    np.testing.assert_array_equal(I, wantI)
    assert (I[0, 4:] == -1).all() and (D[0, 4:] == pad).all()
    np.testing.assert_allclose(D[0, :4], wantD[0, :4], rtol=1e-6)
    D, I = ground_truth(np.empty((0, 3)), q, 2, metric)
    assert (I == -1).all() and (D == pad).all()
    D, I = ground_truth(base, np.empty((0, 3)), 2, metric)
    assert D.shape == I.shape == (0, 2)


def test_ground_truth_integer_input():
    base = np.array([[1, 0], [0, 1], [1, 1], [1, 1]], np.uint8)
    D, I = ground_truth(base, np.array([[1, 1]], np.int64), 3, "ip")
    assert I.tolist() == [[2, 3, 0]] and D.tolist() == [[2.0, 2.0, 1.0]]


def test_ground_truth_errors():
    base = np.ones((5, 3), np.float32)
    q = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="metric"):
        ground_truth(base, q, 2, "dot")
    with pytest.raises(ValueError, match="k must be >= 1"):
        ground_truth(base, q, 0)
    with pytest.raises(ValueError, match="expected dim 3, got 4"):
        ground_truth(base, np.ones((2, 4)), 2)
    bad = base.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="base row 3"):
        ground_truth(bad, q, 2)
    qbad = q.copy()
    qbad[1, 0] = np.inf
    with pytest.raises(ValueError, match="queries row 1"):
        ground_truth(base, qbad, 2, "l2")
    zero = base.copy()
    zero[2] = 0
    with pytest.raises(ValueError, match="base row 2 is a zero vector"):
        ground_truth(zero, q, 2, "cosine")
    with pytest.raises(TypeError):
        ground_truth(base.astype(object), q, 2)
    with pytest.raises(ValueError, match="2-D"):
        ground_truth(base[0], q, 2)
