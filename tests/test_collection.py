"""Collection: SQLite documents + TieredIndex vectors, filters, deletes, reopen, crash safety."""
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import pyknn
from pyknn.embed import CallableEmbedder
from pyknn.rag import Collection, CollectionLockedError, Hit


def hash_vectors(texts, dim=32):
    """A deterministic stand-in model: a seeded random vector per text."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(dim)
                     for t in texts])


def hash_embedder(model_id="hash@1"):
    return CallableEmbedder(hash_vectors, model_id, 32)


TEXTS = [f"document number {i}" for i in range(120)]
META = [{"lang": "en" if i % 3 else "fr", "year": 2000 + i % 25, "tags": {"odd": i % 2 == 1}}
        for i in range(120)]


@pytest.mark.parametrize("spec", ["HNSW32", "Flat", "IVF8,Flat"])
def test_add_search_filter_delete_reopen(tmp_path, spec):
    with Collection(tmp_path / "c", hash_embedder(), index_spec=spec, merge_threshold=50) as c:
        ids = c.add_texts(TEXTS[:100], metadata=META[:100])
        assert ids[:2] == ["doc-1", "doc-2"] and len(c) == 100
        c.add_texts(TEXTS[100:], ids=[f"x{i}" for i in range(20)], metadata=META[100:])
        c.index.wait_merge()
        hits = c.search(TEXTS[7], k=3)
        assert isinstance(hits[0], Hit) and hits[0].id == "doc-8" and hits[0].text == TEXTS[7]
        assert hits[0].score == pytest.approx(1, abs=1e-5) and hits[0].metadata == META[7]
        hits = c.search(TEXTS[7], k=5, where={"lang": "fr"})
        assert hits and all(h.metadata["lang"] == "fr" for h in hits)
        assert hits[0].id != "doc-8"  # 7 % 3 != 0: not French
        hits = c.search(TEXTS[21], k=50, where={"year": {"$gte": 2020}, "tags.odd": True})
        assert hits[0].id == "doc-22"
        assert all(h.metadata["year"] >= 2020 and h.metadata["tags"]["odd"] for h in hits)
        expect = sum(1 for m in META if m["year"] >= 2020 and m["tags"]["odd"])
        assert len(hits) == expect
        assert c.search(TEXTS[0], where={"lang": {"$in": []}}) == []
        assert len(c.search([TEXTS[1], TEXTS[2]], k=2)) == 2
        assert c.delete(["doc-8", "x3"]) == 2
        with pytest.raises(KeyError, match="doc-8"):
            c.delete(["doc-8"])
        assert "doc-8" not in c and len(c) == 118
        assert all(h.id != "doc-8" for h in c.search(TEXTS[7], k=10))
        # Replacing a document: new text, new vector, same id.
        c.add_texts(["a completely new text"], ids=["doc-1"], metadata=[{"lang": "de"}])
        assert c.search("a completely new text", k=1)[0].id == "doc-1"
        assert c.get("doc-1").metadata == {"lang": "de"} and len(c) == 118
    c = Collection(tmp_path / "c", hash_embedder())
    assert c.repaired == (0, 0) and len(c) == 118 and c.index_spec == spec
    assert c.search(TEXTS[50], k=1)[0].id == "doc-51"
    assert c.search("a completely new text", k=1)[0].id == "doc-1"
    c.close()


def test_model_guard_on_reopen(tmp_path):
    with Collection(tmp_path / "c", hash_embedder()) as c:
        c.add_texts(TEXTS[:5])
    with pytest.raises(pyknn.ModelMismatchError, match=r"'hash@1'.*'hash@2'"):
        Collection(tmp_path / "c", hash_embedder("hash@2"))
    with pytest.raises(ValueError, match="unknown index spec 'HNSW'"):
        Collection(tmp_path / "d", hash_embedder(), index_spec="HNSW")


def test_bad_input_changes_nothing(tmp_path):
    c = Collection(tmp_path / "c", hash_embedder())
    c.add_texts(TEXTS[:5])
    with pytest.raises(ValueError, match="2 metadata entries for 3 texts"):
        c.add_texts(TEXTS[5:8], metadata=[{}, {}])
    with pytest.raises(TypeError, match="JSON-serialisable"):
        c.add_texts(TEXTS[5:6], metadata=[{"x": object()}])
    with pytest.raises(ValueError, match="unknown operator '\\$like'"):
        c.search("x", where={"lang": {"$like": "e%"}})
    with pytest.raises(ValueError, match="metadata key"):
        c.search("x", where={"a') OR 1=1 --": 1})
    assert len(c) == 5 and len(c.index) == 5
    c.close()


def test_failed_index_add_rolls_back_sqlite(tmp_path, monkeypatch):
    c = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    c.add_texts(TEXTS[:5])
    monkeypatch.setattr(type(c.index), "add", lambda *a, **k: (_ for _ in ()).throw(MemoryError("x")))
    with pytest.raises(MemoryError):
        c.add_texts(TEXTS[5:10])
    monkeypatch.undo()
    assert len(c) == 5 and len(c.index) == 5
    c.close()


def test_interrupted_embedding_writes_nothing(tmp_path):
    calls = {"n": 0}

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return hash_vectors(texts)

    c = Collection(tmp_path / "c", CallableEmbedder(flaky, "hash@1", 32, batch_size=4))
    with pytest.raises(KeyboardInterrupt):
        c.add_texts(TEXTS[:10])
    assert len(c) == 0 and len(c.index) == 0
    c.close()


def test_interrupted_persist_keeps_the_old_file(tmp_path, monkeypatch):
    import os
    c = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    c.add_texts(TEXTS[:10])
    c.persist()
    c.add_texts(TEXTS[10:20])
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        c.persist()
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")) == []
    c._release()  # as if the process died here: no persist, the folder's lock is dropped
    d = Collection(tmp_path / "c", hash_embedder())  # the old file + SQLite: repaired
    assert d.repaired == (10, 0) and len(d) == 20 and len(d.index) == 20
    assert d.search(TEXTS[15], k=1)[0].id == "doc-16"


def test_process_killed_after_commit_reopens_consistent(tmp_path):
    """A real crash: the child commits documents, persists some, then dies without closing."""
    child = textwrap.dedent(f"""
        import os, zlib
        import numpy as np
        from pyknn.embed import CallableEmbedder
        from pyknn.rag import Collection
        def vec(texts):
            return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(32)
                             for t in texts])
        c = Collection({str(tmp_path / "c")!r}, CallableEmbedder(vec, "hash@1", 32), index_spec="HNSW32")
        c.add_texts([f"document number {{i}}" for i in range(60)])
        c.persist()
        c.add_texts([f"document number {{i}}" for i in range(60, 90)])
        c.delete(["doc-3", "doc-4"])
        os._exit(0)   # no close(), no persist()
    """)
    # From tmp_path: in a source checkout the working directory would shadow the installed pyknn.
    run = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    c = Collection(tmp_path / "c", hash_embedder())
    assert c.repaired == (30, 2)
    assert len(c) == 88 and len(c.index) == 88
    assert c.search(TEXTS[70], k=1)[0].id == "doc-71"
    assert "doc-3" not in c and all(h.id != "doc-4" for h in c.search(TEXTS[3], k=5))
    c.close()


@pytest.mark.model
def test_collection_with_minilm_on_real_text(tmp_path, minilm, sample_texts):
    docs, queries = sample_texts
    chosen = docs[:150]
    with Collection(tmp_path / "wn", minilm, merge_threshold=100) as c:
        c.add_texts([d["text"] for d in chosen], ids=[d["synset"] for d in chosen],
                    metadata=[{"pos": d["synset"][-1]} for d in chosen])
        hits = c.search("a large feline predator", k=5)
        assert len(hits) == 5 and hits[0].score > 0.3
        for h in c.search("to move quickly", k=5, where={"pos": "v"}):
            assert h.metadata["pos"] == "v"
        # The exact text of a document finds that document first.
        assert c.search(chosen[123]["text"], k=1)[0].id == chosen[123]["synset"]
    other = CallableEmbedder(hash_vectors, "hash@1", 32)
    with pytest.raises(pyknn.ModelMismatchError, match="all-MiniLM-L6-v2"):
        Collection(tmp_path / "wn", other)


def test_non_finite_metadata_is_rejected_and_writes_nothing(tmp_path):
    c = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    c.add_texts(TEXTS[:3], metadata=[{"lang": "en"}] * 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"metadata\[1\].*NaN or Infinity"):
            c.add_texts(TEXTS[3:5], metadata=[{"v": 1.0}, {"nested": {"v": bad}}])
    assert len(c) == 3 and len(c.index) == 3
    # Filtered searches still work (no malformed JSON stored).
    assert len(c.search(TEXTS[0], k=3, where={"lang": "en"})) == 3
    c.close()


def test_second_open_instance_is_refused(tmp_path):
    c1 = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    c1.add_texts(["apples and oranges"], ids=["x"])
    with pytest.raises(CollectionLockedError, match="already open"):
        Collection(tmp_path / "c", hash_embedder())
    c1.add_texts(["trains and planes"], ids=["y"])
    c1.close()
    c2 = Collection(tmp_path / "c", hash_embedder())  # the lock went with close()
    assert len(c2) == 2 and len(c2.index) == 2 and c2.repaired == (0, 0)
    # A refused open (here: another model) does not keep the folder locked either.
    with pytest.raises(CollectionLockedError):
        Collection(tmp_path / "c", hash_embedder("hash@2"))
    c2.close()
    with pytest.raises(pyknn.ModelMismatchError):
        Collection(tmp_path / "c", hash_embedder("hash@2"))
    Collection(tmp_path / "c", hash_embedder()).close()


def test_open_in_another_process_is_refused_until_it_exits(tmp_path):
    child = textwrap.dedent(f"""
        import sys
        import numpy as np
        from pyknn.embed import CallableEmbedder
        from pyknn.rag import Collection
        c = Collection({str(tmp_path / "c")!r},
                       CallableEmbedder(lambda t: np.ones((len(t), 32)), "hash@1", 32))
        print("open", flush=True)
        sys.stdin.readline()   # hold the collection open until told to go
        import os; os._exit(0)  # die without close(): the OS drops the lock
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "open\n", proc.stderr.read()
        with pytest.raises(CollectionLockedError, match="already open"):
            Collection(tmp_path / "c", hash_embedder())
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    Collection(tmp_path / "c", hash_embedder()).close()


def test_default_ids_are_never_reused(tmp_path):
    c = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    assert c.add_texts(TEXTS[:3]) == ["doc-1", "doc-2", "doc-3"]
    c.delete(["doc-3"])
    assert c.add_texts(TEXTS[3:4]) == ["doc-4"]
    c.delete(["doc-4", "doc-2"])
    c.close()
    c = Collection(tmp_path / "c", hash_embedder())
    assert c.add_texts(TEXTS[4:5]) == ["doc-5"]
    assert c.add_texts(TEXTS[5:6], ids=["mine"]) == ["mine"]
    assert c.add_texts(TEXTS[6:7]) == ["doc-7"]
    assert c.search(TEXTS[4], k=1)[0].id == "doc-5" and len(c) == 4
    c.close()


def test_argument_checks_and_closed_collection(tmp_path):
    for metric in ("l2", "manhattan"):
        with pytest.raises(ValueError, match="metric"):
            Collection(tmp_path / metric, hash_embedder(), metric=metric)
        assert not (tmp_path / metric).exists()  # nothing created
    c = Collection(tmp_path / "c", hash_embedder(), index_spec="Flat")
    c.add_texts(TEXTS[:3], ids=["a", 7, np.int64(8)],
                metadata=[{"y": 2020}, {"y": 2021}, {"y": 2022}])
    assert "7" in c and "8" in c
    for bad in ([None], [1.5], [True], [b"x"]):
        with pytest.raises(TypeError, match="document id"):
            c.add_texts(TEXTS[3:4], ids=bad)
    with pytest.raises(TypeError, match="list of document ids"):
        c.delete(5)
    assert c.delete([7]) == 1
    assert [h.id for h in c.search(TEXTS[2], where={"y": np.int64(2022)})] == ["8"]
    assert [h.id for h in c.search(TEXTS[2], where={"y": {"$gte": np.float32(2021.5)}})] == ["8"]
    with pytest.raises(TypeError, match="where must be a dict"):
        c.search("x", where=[])
    assert len(c.search(TEXTS[0], where={})) == 2
    assert len(c) == 2
    c.close()
    c.close()  # twice is fine
    for call in (lambda: len(c), lambda: "a" in c, lambda: c.get("a"), lambda: c.search("x"),
                 lambda: c.add_texts(["q"]), lambda: c.delete(["a"]), c.persist):
        with pytest.raises(ValueError, match="is closed"):
            call()


def test_foreign_index_file_does_not_leak_the_database(tmp_path):
    with Collection(tmp_path / "c", hash_embedder(), index_spec="Flat") as c:
        c.add_texts(TEXTS[:3])
    with Collection(tmp_path / "d", hash_embedder("other@1"), index_spec="Flat") as d:
        d.add_texts(TEXTS[:3])
    (tmp_path / "c" / "vectors.pyknn").write_bytes((tmp_path / "d" / "vectors.pyknn").read_bytes())
    with pytest.raises(pyknn.ModelMismatchError):
        Collection(tmp_path / "c", hash_embedder())
    # The refused open released its lock and database: the folder opens (and can be fixed).
    (tmp_path / "c" / "vectors.pyknn").unlink()
    with Collection(tmp_path / "c", hash_embedder()) as c:
        assert len(c) == 3 and c.repaired == (3, 0)
