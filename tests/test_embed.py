"""Embedders: the protocol, prefixes, truncation, batching; the real MiniLM model (offline);
the OpenAI client against a local server that serves the same model; CallableEmbedder."""
import importlib.util
import os
import re

import numpy as np
import pytest

import pyknn
import pyknn.datasets
from pyknn.embed import (PREFIXES, CallableEmbedder, Embedder, OpenAIEmbedder,
                         SentenceTransformerEmbedder)

model = pytest.mark.model
needs_openai = pytest.mark.skipif(importlib.util.find_spec("openai") is None
                                  and not os.environ.get("PYKNN_REQUIRE_MODEL"),
                                  reason="openai is not installed (pip install '.[embed]')")


class Recorder:
    """A deterministic toy model that records every batch it receives."""

    def __init__(self, dim=6):
        self.batches = []
        self.dim = dim

    def __call__(self, texts):
        self.batches.append(list(texts))
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            out[i, :] = [len(t), t.count("a") + 1, t.count(":"), 1, 2, 3][:self.dim]
        return out


def test_callable_embedder_normalises_batches_and_prefixes():
    rec = Recorder()
    e = CallableEmbedder(rec, "toy@1", 6, prefixes="e5", batch_size=2)
    assert isinstance(e, Embedder) and e.model_id == "toy@1+prefix=e5" and e.dim == 6
    v = e.encode_documents(["a", "bb", "ccc"])
    assert v.dtype == np.float32 and v.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    assert rec.batches == [["passage: a", "passage: bb"], ["passage: ccc"]]
    e.encode_queries("x")
    assert rec.batches[-1] == ["query: x"]
    assert e.encode_documents([]).shape == (0, 6)


def test_prefix_presets_and_custom_pair():
    assert PREFIXES["bge"][0].startswith("Represent this sentence") and PREFIXES["bge"][1] == ""
    rec = Recorder()
    CallableEmbedder(rec, "t@1", 6, prefixes="bge").encode_queries(["q"])
    assert rec.batches[-1] == [PREFIXES["bge"][0] + "q"]
    CallableEmbedder(rec, "t@1", 6, prefixes=("Q> ", "D> ")).encode_documents(["d"])
    assert rec.batches[-1] == ["D> d"]
    with pytest.raises(ValueError, match="unknown prefix preset 'e6'"):
        CallableEmbedder(rec, "t@1", 6, prefixes="e6")


def test_truncate_dim_renormalises_and_checks():
    e = CallableEmbedder(lambda t: np.tile([3.0, 4.0, 12.0], (len(t), 1)), "t@1", 3, truncate_dim=2)
    np.testing.assert_allclose(e.encode_documents(["x"]), [[0.6, 0.8]], rtol=1e-6)
    assert e.dim == 2
    with pytest.raises(ValueError, match="truncate_dim 4 is larger than the model's dimension 3"):
        CallableEmbedder(lambda t: None, "t@1", 3, truncate_dim=4)


def test_bad_model_output_is_a_clear_error():
    e = CallableEmbedder(lambda t: np.ones((len(t), 5)), "t@1", 4)
    with pytest.raises(ValueError, match=r"returned shape \(2, 5\) for 2 texts, expected \(2, 4\)"):
        e.encode_documents(["a", "b"])
    z = CallableEmbedder(lambda t: np.zeros((len(t), 4)), "t@1", 4, batch_size=1)
    with pytest.raises(ValueError, match="text 0 is zero"):
        z.encode_documents(["a"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string"):
        CallableEmbedder(Recorder(), "t@1", 6).encode_documents(["a", 3])


def test_guard_through_embedders():
    a = CallableEmbedder(Recorder(), "model-a@1", 6)
    b = CallableEmbedder(Recorder(), "model-b@7", 6)
    idx = pyknn.FlatIndex(6, "ip")
    idx.add_texts(["alpha", "beta", "gamma"], a)
    assert idx.model_id == "model-a@1"
    with pytest.raises(pyknn.ModelMismatchError, match=r"'model-b@7'.*'model-a@1'"):
        idx.add_texts(["delta"], b)
    with pytest.raises(pyknn.ModelMismatchError):
        idx.search_texts("alpha", b)
    assert len(idx) == 3
    D, I = idx.search_texts("alpha", a, k=1)
    assert I[0, 0] == 0


# ----------------------------------------------------------------------------- the real model
@model
def test_minilm_reproduces_the_bundled_vectors(minilm, sample_texts):
    """The embedder gives the vectors the sample was built from (same model, same pipeline)."""
    docs, queries = sample_texts
    sample = pyknn.datasets.load_sample()
    base, qv = sample.base, sample.queries
    rows = [0, 17, 512, 4095, 9999]
    v = minilm.encode_documents([docs[i]["text"] for i in rows])
    assert v.shape == (5, 384) and v.dtype == np.float32
    cos = np.einsum("ij,ij->i", v, base[rows].astype(np.float32))
    assert cos.min() > 0.999, cos
    q = minilm.encode_queries([queries[i]["text"] for i in (0, 1, 2)])
    assert np.einsum("ij,ij->i", q, qv[:3].astype(np.float32)).min() > 0.999
    assert minilm.model_id.startswith("sentence-transformers/all-MiniLM-L6-v2@sha256:")


@model
def test_minilm_truncate_and_batches(minilm):
    texts = ["a dog runs in the park", "stock markets fell", "a puppy plays outside"]
    full = minilm.encode_documents(texts)
    t = SentenceTransformerEmbedder(minilm.model, name="mini", revision="r1", truncate_dim=64,
                                    batch_size=2)
    assert (t.model_id, t.dim) == ("mini@r1+dim=64", 64)
    v = t.encode_documents(texts)
    expect = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(v, expect, atol=2e-5)
    with pytest.raises(ValueError, match="truncate_dim 385 is larger than the model's dimension 384"):
        SentenceTransformerEmbedder(minilm.model, truncate_dim=385)
    # Meaning: the puppy is nearer the dog than the stock market.
    assert full[0] @ full[2] > full[0] @ full[1] + 0.2


# ----------------------------------------------------------------------------- OpenAI client
@pytest.fixture(scope="module")
def server(minilm):
    from embed_server import EmbeddingServer
    with EmbeddingServer(minilm) as s:
        yield s


@model
@needs_openai
def test_openai_embedder_matches_the_model(server, minilm, monkeypatch):
    monkeypatch.setenv("PYKNN_TEST_KEY", "sk-test")
    e = OpenAIEmbedder("all-MiniLM-L6-v2", base_url=server.url, api_key_env="PYKNN_TEST_KEY",
                       batch_size=3, backoff=0.01)
    assert e.dim == 384  # probed: not a known OpenAI model
    texts = [f"sentence number {i} about dogs" for i in range(7)]
    server.requests.clear()
    v = e.encode_documents(texts)
    np.testing.assert_allclose(v, minilm.encode_documents(texts), atol=1e-5)
    assert [len(r["input"]) for r in server.requests] == [3, 3, 1]
    assert all(r["model"] == "all-MiniLM-L6-v2" for r in server.requests)


@model
@needs_openai
def test_openai_dimensions_parameter(server, minilm):
    e = OpenAIEmbedder("all-MiniLM-L6-v2", base_url=server.url, api_key="k", dimensions=128)
    assert e.dim == 128 and e.model_id == "all-MiniLM-L6-v2/128d@api"
    server.requests.clear()
    v = e.encode_queries(["quoll"])
    assert server.requests[0]["dimensions"] == 128
    full = minilm.encode_documents(["quoll"])[:, :128]
    np.testing.assert_allclose(v, full / np.linalg.norm(full), atol=1e-5)


@model
@needs_openai
def test_openai_retries_429_and_5xx_then_succeeds(server):
    e = OpenAIEmbedder("all-MiniLM-L6-v2", base_url=server.url, api_key="k", dim=384,
                       backoff=0.01, max_retries=3)
    server.fail_next = [429, 500, 503]
    v = e.encode_documents(["retry me"])
    assert v.shape == (1, 384) and e.requests == 4 and server.fail_next == []


@model
@needs_openai
def test_openai_gives_up_after_max_retries_and_not_on_400(server):
    import openai
    e = OpenAIEmbedder("all-MiniLM-L6-v2", base_url=server.url, api_key="k", dim=384,
                       backoff=0.01, max_retries=2)
    server.fail_next = [429, 429, 429, 429]
    with pytest.raises(openai.RateLimitError):
        e.encode_documents(["x"])
    assert e.requests == 3
    server.fail_next = [400]
    with pytest.raises(openai.BadRequestError):
        e.encode_documents(["x"])
    assert e.requests == 4


@needs_openai
def test_openai_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIEmbedder("text-embedding-3-small")


def test_model_id_names_prefixes_and_truncation():
    rec = Recorder()
    ids = {
        "plain": CallableEmbedder(rec, "t@1", 6).model_id,
        "none": CallableEmbedder(rec, "t@1", 6, prefixes="none").model_id,
        "e5": CallableEmbedder(rec, "t@1", 6, prefixes="e5").model_id,
        "e5 pair": CallableEmbedder(rec, "t@1", 6, prefixes=PREFIXES["e5"]).model_id,
        "bge": CallableEmbedder(rec, "t@1", 6, prefixes="bge").model_id,
        "custom": CallableEmbedder(rec, "t@1", 6, prefixes=("Q> ", "D> ")).model_id,
        "custom2": CallableEmbedder(rec, "t@1", 6, prefixes=("Q> ", "")).model_id,
        "dim": CallableEmbedder(rec, "t@1", 6, truncate_dim=4).model_id,
        "e5 dim": CallableEmbedder(rec, "t@1", 6, prefixes="e5", truncate_dim=np.int64(4)).model_id,
    }
    assert ids["plain"] == ids["none"] == "t@1"
    assert ids["e5"] == ids["e5 pair"] == "t@1+prefix=e5"
    assert ids["bge"] == "t@1+prefix=bge"
    assert re.fullmatch(r"t@1\+prefix=custom:[0-9a-f]{12}", ids["custom"])
    assert ids["custom"] != ids["custom2"]
    assert ids["dim"] == "t@1+dim=4" and ids["e5 dim"] == "t@1+prefix=e5+dim=4"
    # The guard therefore refuses vectors of another prefix setup.
    idx = pyknn.FlatIndex(6)
    e5 = CallableEmbedder(rec, "t@1", 6, prefixes="e5")
    idx.add_texts(["a"], e5)
    with pytest.raises(pyknn.ModelMismatchError):
        idx.add_texts(["b"], CallableEmbedder(rec, "t@1", 6))
    assert CallableEmbedder(rec, "t@1", np.int64(6)).dim == 6


@model
def test_model_objects_get_a_weights_revision(minilm):
    import copy
    import torch
    a = SentenceTransformerEmbedder(minilm.model)
    b = SentenceTransformerEmbedder(minilm.model)
    assert a.model_id == b.model_id and re.search(r"@sha256:[0-9a-f]{12}$", a.model_id)
    tuned = copy.deepcopy(minilm.model)
    with torch.no_grad():
        next(tuned.parameters())[0, 0] += 1
    assert SentenceTransformerEmbedder(tuned).model_id != a.model_id
    assert SentenceTransformerEmbedder(minilm.model, revision="r9").model_id.endswith("@r9")

    class NoWeights:
        def get_sentence_embedding_dimension(self):
            return 4

    with pytest.raises(ValueError, match="revision="):
        SentenceTransformerEmbedder(NoWeights())
    assert SentenceTransformerEmbedder(NoWeights(), name="x", revision="1").model_id == "x@1"


def test_callable_embedder_extreme_values_and_option_types():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from overflow
        v = CallableEmbedder(lambda t: np.full((len(t), 4), 1e30), "m@1", 4).encode_documents(["a"])
        np.testing.assert_allclose(v, 0.5, atol=1e-6)
        v = CallableEmbedder(lambda t: np.full((len(t), 4), 1e300), "m@1", 4).encode_documents(["a"])
        np.testing.assert_allclose(v, 0.5, atol=1e-6)
        with pytest.raises(ValueError, match="not finite"):
            CallableEmbedder(lambda t: np.full((len(t), 4), np.inf), "m@1", 4).encode_documents(["a"])
        with pytest.raises(ValueError, match="zero"):
            CallableEmbedder(lambda t: np.zeros((len(t), 4)), "m@1", 4).encode_documents(["a"])
    with pytest.raises(TypeError, match="progress"):
        CallableEmbedder(lambda t: t, "m@1", 4, progress="no")


@needs_openai
def test_openai_argument_types():
    with pytest.raises(TypeError, match="max_retries"):
        OpenAIEmbedder(api_key="x", max_retries="3")
    with pytest.raises(TypeError, match="max_retries"):
        OpenAIEmbedder(api_key="x", max_retries=2.5)
    with pytest.raises(TypeError, match="backoff"):
        OpenAIEmbedder(api_key="x", backoff="1")


@needs_openai
@pytest.mark.parametrize("indices", [[0, 0], [1, 2], [0, 1, 2]])
def test_openai_rejects_bad_response_indices(indices):
    from types import SimpleNamespace as NS

    class Client:
        class embeddings:
            @staticmethod
            def create(model, input, **kw):
                return NS(data=[NS(index=i, embedding=[1.0, 0.0]) for i in indices])

    e = OpenAIEmbedder("m", client=Client(), dim=2)
    with pytest.raises(ValueError, match="returned"):
        e.encode_documents(["a", "b"])


@model
def test_load_minilm_prints_no_progress_bar(capfd, model_available):
    from pyknn.embed import load_minilm
    load_minilm()
    assert "Loading weights" not in capfd.readouterr().err


def test_add_texts_returns_the_ids_assigned():
    from pyknn.rag import MatryoshkaIndex, TieredIndex
    e = CallableEmbedder(Recorder(), "t@1", 6)
    for idx in (pyknn.FlatIndex(6), pyknn.HNSWIndex(6), TieredIndex(pyknn.FlatIndex(6)),
                MatryoshkaIndex(6, 6, first_stage="flat")):
        got = idx.add_texts(["a", "bb", "ccc"], e)
        assert got.dtype == np.int64 and got.tolist() == [0, 1, 2], type(idx).__name__
        assert idx.add_texts(["dddd"], e, ids=[10]).tolist() == [10]
        assert idx.add_texts(["e", "ff"], e).tolist() == [11, 12]
        assert sorted(idx.ids.tolist()) == [0, 1, 2, 10, 11, 12]
