"""The embedding-model guard, index metadata and the normalisation policy, on every index kind."""
import pickle
import warnings

import numpy as np
import pytest

import pyknn

from conftest import clustered


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(kind, dim, metric="ip"):
    if kind == "flat":
        return pyknn.FlatIndex(dim, metric)
    if kind == "ivf":
        idx = pyknn.IVFFlatIndex(dim, nlist=4, metric=metric, nprobe=4)
        idx.train(unit(clustered(200, dim, seed=9)))
        return idx
    return pyknn.HNSWIndex(dim, M=8, ef_construction=40, metric=metric)


KINDS = ["flat", "ivf", "hnsw"]


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_fields(kind):
    idx = make(kind, 16, "cosine")
    m = idx.metadata
    assert m["dim"] == 16 and m["metric"] == "cosine" and m["normalized"] is True
    assert m["model_id"] is None and m["pyknn_version"] == pyknn.__version__
    assert m["created_at"].endswith("+00:00")


@pytest.mark.parametrize("kind", KINDS)
def test_guard_on_add_and_search_survives_save_load(tmp_path, kind):
    x = unit(clustered(300, 16, seed=1))
    idx = make(kind, 16)
    idx.add(x[:200], model_id="mini@1")
    assert idx.model_id == "mini@1" and idx.metadata["model_id"] == "mini@1"
    with pytest.raises(pyknn.ModelMismatchError, match=r"'other@2'.*'mini@1'"):
        idx.add(x[200:], model_id="other@2")
    assert len(idx) == 200  # unchanged
    with pytest.raises(pyknn.ModelMismatchError, match="other@2"):
        idx.search(x[:3], 5, model_id="other@2")
    D, I = idx.search(x[:3], 5, model_id="mini@1")
    assert I.shape == (3, 5)
    idx.save(tmp_path / "i.pyknn")
    loaded = pyknn.load(tmp_path / "i.pyknn")
    assert loaded.model_id == "mini@1"
    with pytest.raises(pyknn.ModelMismatchError):
        loaded.search(x[:3], 5, model_id="other@2")
    with pytest.raises(pyknn.ModelMismatchError):
        pickle.loads(pickle.dumps(idx)).add(x[200:], model_id="other@2")
    # Without a model id nothing is asserted (raw vectors), and the binding stays.
    loaded.add(x[200:])
    assert loaded.model_id == "mini@1" and len(loaded) == 300


def test_mismatch_is_a_value_error_and_bind_model():
    idx = pyknn.FlatIndex(4)
    idx.bind_model("a@1")
    idx.bind_model("a@1")
    with pytest.raises(ValueError):
        idx.bind_model("b@1")
    with pytest.raises(TypeError, match="model_id"):
        idx.add(np.eye(4), model_id=3)
    assert len(idx) == 0


def test_failed_add_does_not_bind_the_model():
    idx = pyknn.FlatIndex(4)
    with pytest.raises(ValueError, match="expected dim 4, got 3"):
        idx.add(np.eye(3), model_id="a@1")
    assert idx.model_id is None
    bad = np.eye(4)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        idx.add(bad, model_id="a@1")
    assert idx.model_id is None and len(idx) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_ip_norm_policy(kind):
    x = unit(clustered(100, 16, seed=3))
    idx = make(kind, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unit vectors (float16 rounding included): no warning
        idx.add(x.astype(np.float16))
    assert idx.metadata["normalized"] is True
    long = x[:10] * 1.5
    with pytest.warns(pyknn.NormWarning, match=r"10 of 10 vectors are not unit length.*1\.5"):
        idx.add(long, ids=np.arange(1000, 1010))
    assert len(idx) == 110 and idx.metadata["normalized"] is False
    with pytest.raises(ValueError, match=r"1 of 3 vectors .*first at row 1.*nothing was added"):
        idx.add(np.stack([x[0], x[1] * 1.01, x[2]]), ids=[2000, 2001, 2002], strict=True)
    assert len(idx) == 110
    idx.strict_norms = True
    with pytest.raises(ValueError, match="not unit length"):
        idx.add(x[:2] * 0.5, ids=[3000, 3001])
    idx.add(x[:2] * (1 + 5e-4), ids=[3000, 3001])  # within the 1e-3 tolerance
    assert len(idx) == 112


def test_one_warning_per_add_call():
    idx = pyknn.FlatIndex(8, "ip")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        idx.add(np.ones((50, 8)))
    assert len([x for x in w if issubclass(x.category, pyknn.NormWarning)]) == 1


def test_cosine_normalises_and_l2_does_not_warn():
    x = clustered(20, 8, seed=4) * 3
    c = pyknn.FlatIndex(8, "cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.add(x)
        l2 = pyknn.FlatIndex(8, "l2")
        l2.add(x)
    np.testing.assert_allclose(np.linalg.norm(c.get(np.arange(20)), axis=1), 1, atol=1e-6)
    assert c.metadata["normalized"] is True and l2.metadata["normalized"] is False


def test_bool_options_reject_other_values():
    x = np.eye(4, dtype=np.float32)
    idx = pyknn.FlatIndex(4)
    for bad in ("no", "False", 0, None, 1.0):
        if bad is None:
            continue  # strict=None means the default
        with pytest.raises(TypeError, match="strict"):
            idx.add(x, strict=bad)
        with pytest.raises(TypeError, match="strict_norms"):
            idx.strict_norms = bad
    assert len(idx) == 0
    idx.add(x, strict=np.bool_(True))
    from pyknn.rag import MatryoshkaIndex, TieredIndex
    t = TieredIndex(pyknn.FlatIndex(4), auto_merge=None)
    t.add(x)
    m = MatryoshkaIndex(4, 4, first_stage="flat")
    m.add(x)
    for index in (t, m):
        with pytest.raises(TypeError, match="missing_ok"):
            index.remove([99], missing_ok="yes")
        assert len(index) == 4
