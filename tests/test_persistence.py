"""save/load, the file format's checks, and broken files."""
import os
import struct

import numpy as np
import pytest

import pyknn

from conftest import clustered


@pytest.fixture
def index():
    x = clustered(300, 12, seed=1)
    idx = pyknn.FlatIndex(12, "l2")
    idx.add(x, ids=np.arange(300) * 7 - 51)
    idx.metadata["model_id"] = "test-model@1"
    return idx, x


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_round_trip_identical_results(tmp_path, metric):
    x = clustered(400, 20, seed=2)
    idx = pyknn.FlatIndex(20, metric)
    idx.add(x)
    idx.remove([3, 5])
    path = tmp_path / "flat.pyknn"
    idx.save(path)
    loaded = pyknn.load(path)
    assert type(loaded) is pyknn.FlatIndex
    assert (loaded.dim, loaded.metric, len(loaded)) == (20, metric, 398)
    np.testing.assert_array_equal(loaded.ids, idx.ids)
    for a, b in zip(loaded.search(x[:30], 8), idx.search(x[:30], 8)):
        np.testing.assert_array_equal(a, b)
    # Default ids continue where they left off.
    loaded.add(x[0])
    assert loaded.ids[-1] == 400


def test_metadata_survives(tmp_path, index):
    idx, _ = index
    idx.save(str(tmp_path / "a.idx"))
    loaded = pyknn.load(str(tmp_path / "a.idx"))
    assert loaded.metadata["model_id"] == "test-model@1"
    assert loaded.metadata["metric"] == "l2" and loaded.metadata["dim"] == 12
    assert loaded.metadata["pyknn_version"] == pyknn.__version__


def test_unserialisable_metadata_is_a_clear_error(tmp_path, index):
    idx, _ = index
    idx.metadata["bad"] = object()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        idx.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_empty_index_round_trip(tmp_path):
    idx = pyknn.FlatIndex(5, "cosine")
    idx.save(tmp_path / "e")
    loaded = pyknn.load(tmp_path / "e")
    assert len(loaded) == 0 and loaded.metric == "cosine"
    assert loaded.search(np.ones(5), 2)[1].tolist() == [[-1, -1]]


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, index):
    idx, _ = index
    path = tmp_path / "i.pyknn"
    path.write_bytes(b"old contents")
    idx.save(path)
    assert os.listdir(tmp_path) == ["i.pyknn"]
    assert len(pyknn.load(path)) == 300


def test_save_to_missing_directory(tmp_path, index):
    idx, _ = index
    with pytest.raises(FileNotFoundError):
        idx.save(tmp_path / "no" / "such" / "dir.idx")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        pyknn.load(tmp_path / "missing.idx")
    with pytest.raises(IsADirectoryError):
        pyknn.load(tmp_path)


def _saved(tmp_path, index):
    idx, _ = index
    path = tmp_path / "good.idx"
    idx.save(path)
    return path.read_bytes()


def _load_bytes(tmp_path, data):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    return pyknn.load(path)


def test_empty_file(tmp_path):
    with pytest.raises(pyknn.FormatError, match="not a pyknn index file"):
        _load_bytes(tmp_path, b"")


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for n in (10, 100, 10_000):
        with pytest.raises(pyknn.FormatError):
            _load_bytes(tmp_path, rng.bytes(n))


def test_wrong_magic(tmp_path, index):
    data = bytearray(_saved(tmp_path, index))
    data[:8] = b"NOTANIDX"
    with pytest.raises(pyknn.FormatError, match="wrong magic"):
        _load_bytes(tmp_path, bytes(data))


def test_future_version(tmp_path, index):
    data = bytearray(_saved(tmp_path, index))
    data[8:12] = struct.pack("<I", 99)
    with pytest.raises(pyknn.FormatError, match=r"version 99 .*reads versions 1 to 2.*newer"):
        _load_bytes(tmp_path, bytes(data))


def test_unknown_kind(tmp_path, index):
    data = bytearray(_saved(tmp_path, index))
    data[12:16] = struct.pack("<I", 77)
    with pytest.raises(pyknn.FormatError, match="unknown index kind 77"):
        _load_bytes(tmp_path, bytes(data))


def test_truncated_everywhere(tmp_path, index):
    data = _saved(tmp_path, index)
    for cut in [1, 8, 20, 39, 40, 60, len(data) // 2, len(data) - 9, len(data) - 1]:
        with pytest.raises(pyknn.FormatError):
            _load_bytes(tmp_path, data[:cut])


def test_trailing_garbage(tmp_path, index):
    data = _saved(tmp_path, index)
    with pytest.raises(pyknn.FormatError, match="unexpected bytes after the end"):
        _load_bytes(tmp_path, data + b"xyz")


def test_flipped_byte_fails_checksum(tmp_path, index):
    data = bytearray(_saved(tmp_path, index))
    data[len(data) // 2] ^= 0x40  # inside the vector section
    with pytest.raises(pyknn.FormatError, match="checksum"):
        _load_bytes(tmp_path, bytes(data))


def test_huge_count_is_rejected_before_allocating(tmp_path, index):
    data = bytearray(_saved(tmp_path, index))
    data[32:40] = struct.pack("<Q", 2**40)  # count: 2**40 vectors of dim 12
    with pytest.raises(pyknn.FormatError, match="truncated|corrupted"):
        _load_bytes(tmp_path, bytes(data))
    data[24:32] = struct.pack("<Q", 2**62)  # dim
    with pytest.raises(pyknn.FormatError, match="invalid dimension"):
        _load_bytes(tmp_path, bytes(data))


def test_from_bytes_rejects_garbage():
    import pickle
    from pyknn.indexes import _from_bytes
    with pytest.raises(pyknn.FormatError):
        _from_bytes(b"\x00" * 64)
    with pytest.raises(TypeError):
        _from_bytes("text")
    assert issubclass(pyknn.FormatError, ValueError)
    good = pyknn.FlatIndex(3)
    assert len(pickle.loads(pickle.dumps(good))) == 0


def test_golden_file_v1_loads():
    """A file written by format version 1 must keep loading in every later release."""
    path = os.path.join(os.path.dirname(__file__), "data", "flat_v1.pyknn")
    idx = pyknn.load(path)
    assert type(idx) is pyknn.FlatIndex and idx.metric == "l2" and idx.dim == 4
    assert idx.ids.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(idx.get([20]), [[0, 1, 0, 0]])
    assert idx.search([0, 0, 0.9, 0], 1)[1].tolist() == [[30]]
    assert idx.metadata["model_id"] == "golden"


@pytest.mark.parametrize("name,cls,extra,mmap", [
    ("ivf_flat_v1", "IVFFlatIndex", {"nlist": 2, "nprobe": 2}, False),
    ("hnsw_v1", "HNSWIndex", {"M": 4, "ef_construction": 16}, False),
    ("hnsw_v2", "HNSWIndex", {"M": 4, "ef_construction": 16}, False),
    ("hnsw_v2", "HNSWIndex", {"M": 4, "ef_construction": 16}, True),
    ("ivf_pq_v1", "IVFPQIndex", {"nlist": 2, "nprobe": 2, "pq_m": 2, "nbits": 4, "rerank": 6,
                                 "rerank_dtype": "float32"}, False),
    ("pq_v1", "PQIndex", {"pq_m": 2, "nbits": 4, "rerank": 6, "rerank_dtype": "float32"}, False),
])
def test_golden_files_of_other_kinds_load(name, cls, extra, mmap):
    """Files of every format version and index kind keep loading, with the same answers
    (version 2 added aligned sections to HNSW files, which can be memory-mapped)."""
    idx = pyknn.load(os.path.join(os.path.dirname(__file__), "data", f"{name}.pyknn"), mmap=mmap)
    assert type(idx).__name__ == cls and idx.metric == "l2" and len(idx) == 6
    for key, value in extra.items():
        assert getattr(idx, key) == value
    assert sorted(idx.ids.tolist()) == [10, 20, 30, 40, 50, 60]
    D, I = idx.search([0, 0, 0.9, 0.1], 2)
    assert I.tolist() == [[30, 60]]
    np.testing.assert_allclose(D, [[0.02, 0.82]], rtol=1e-5)
    np.testing.assert_array_equal(idx.get([50]), [[1, 1, 0, 0]])
    assert idx.metadata["model_id"] == "golden"


def _section(data, tag):
    """Offset of the payload of the first section named ``tag`` (4 bytes) in an index file."""
    at = bytes(data).index(tag + b"\0\0\0\0")
    return at + 16


@pytest.mark.parametrize("make", ["ivf_flat", "ivf_pq", "pq", "flat", "hnsw"])
def test_valid_checksum_does_not_excuse_bad_contents(make):
    """A file whose checksum matches (written by a buggy tool, or forged) is still checked:
    NaN centroids and a negative next default id are FormatErrors, not a broken index."""
    from conftest import reseal
    from pyknn.indexes import _from_bytes
    x = clustered(400, 16, seed=4)
    idx = {"ivf_flat": lambda: pyknn.IVFFlatIndex(16, nlist=4),
           "ivf_pq": lambda: pyknn.IVFPQIndex(16, nlist=4, pq_m=4),
           "pq": lambda: pyknn.PQIndex(16, pq_m=4),
           "flat": lambda: pyknn.FlatIndex(16), "hnsw": lambda: pyknn.HNSWIndex(16)}[make]()
    if hasattr(idx, "train"):
        idx.train(x)
    idx.add(x)
    good = idx.to_bytes()
    assert len(_from_bytes(reseal(good))) == 400
    data = bytearray(good)
    at = _section(data, b"NXID")
    data[at:at + 8] = struct.pack("<q", -5)
    with pytest.raises(pyknn.FormatError, match="next default id -5 is negative"):
        _from_bytes(reseal(data))
    if make in ("flat", "hnsw"):
        return
    for tag in (b"CENT", b"PQCT") if make != "ivf_flat" else (b"CENT",):
        data = bytearray(good)
        at = _section(data, tag) + 4 * 16 * (1 if tag == b"CENT" and make != "pq" else 0) + 8
        data[at:at + 4] = struct.pack("<f", float("nan"))
        with pytest.raises(pyknn.FormatError, match="corrupted index file: .*centroids row .* NaN"):
            _from_bytes(reseal(data))
