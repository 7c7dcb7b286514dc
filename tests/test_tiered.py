"""TieredIndex: fresh + main tiers, upserts, removal across tiers, merges (also in background
threads while searches and writes go on), persistence."""
import pickle
import threading

import numpy as np
import pytest

import pyknn
from pyknn.rag import TieredIndex

from conftest import assert_damage_rejected, clustered


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference(vectors: dict, metric="cosine"):
    """An exact FlatIndex over the live {id: vector} state."""
    ref = pyknn.FlatIndex(next(iter(vectors.values())).shape[0], metric)
    ids = np.array(sorted(vectors), dtype=np.int64)
    ref.add(np.stack([vectors[i] for i in ids]), ids)
    return ref


def same_results(a, b):
    (Da, Ia), (Db, Ib) = a, b
    np.testing.assert_allclose(Da, Db, rtol=1e-5, atol=1e-6)
    # Equal scores may come in either order: compare id sets per row where scores tie.
    for ra, rb in zip(Ia, Ib):
        assert set(ra.tolist()) == set(rb.tolist())


@pytest.mark.parametrize("main_kind", ["flat", "hnsw"])
def test_add_is_searchable_at_once_and_merge_keeps_results(main_kind):
    x = unit(clustered(600, 16, seed=1))
    main = pyknn.FlatIndex(16, "cosine") if main_kind == "flat" else \
        pyknn.HNSWIndex(16, M=16, ef_construction=100, metric="cosine")
    t = TieredIndex(main, auto_merge=None)
    t.add(x[:400])
    t.merge()
    assert (len(t), t.fresh_size, len(t.main)) == (400, 0, 400)
    t.add(x[400:], ids=np.arange(400, 600))
    assert (len(t), t.fresh_size) == (600, 200)
    D, I = t.search(x[450], 1, ef_search=200) if main_kind == "hnsw" else t.search(x[450], 1)
    assert I[0, 0] == 450
    ref = reference({i: x[i] for i in range(600)})
    if main_kind == "flat":
        same_results(t.search(x[:50], 10), ref.search(x[:50], 10))
    t.merge()
    assert (len(t), t.fresh_size, len(t.main)) == (600, 0, 600)
    if main_kind == "flat":
        same_results(t.search(x[:50], 10), ref.search(x[:50], 10))
    assert sorted(t.ids.tolist()) == list(range(600))


def test_newest_version_wins_and_ids_appear_once():
    x = unit(clustered(300, 8, seed=2))
    t = TieredIndex(pyknn.FlatIndex(8, "cosine"), auto_merge=None)
    t.add(x[:200])
    t.merge()
    # Replace id 5 (in main) and id 250 (in fresh) with new vectors.
    t.add(x[200:260], ids=np.arange(200, 260))
    t.add(np.stack([x[290], x[291]]), ids=[5, 250])
    assert len(t) == 260
    np.testing.assert_allclose(t.get([5, 250]), [x[290], x[291]], atol=1e-6)
    D, I = t.search(x[290], 3)
    assert I[0, 0] == 5 and D[0, 0] == pytest.approx(1, abs=1e-5)
    D, I = t.search(x[5], 260)
    assert len(set(I[0].tolist())) == 260  # every id once, none missing
    live = {i: x[i] for i in range(260)}
    live[5], live[250] = x[290], x[291]
    same_results(t.search(x[:40], 20), reference(live).search(x[:40], 20))
    t.merge()
    same_results(t.search(x[:40], 20), reference(live).search(x[:40], 20))


def test_remove_across_tiers_and_errors_leave_state():
    x = unit(clustered(100, 8, seed=3))
    t = TieredIndex(pyknn.FlatIndex(8, "cosine"), auto_merge=None)
    t.add(x[:60])
    t.merge()
    t.add(x[60:], ids=np.arange(60, 100))
    with pytest.raises(KeyError, match="1000"):
        t.remove([3, 70, 1000])
    assert len(t) == 100 and 3 in t and 70 in t
    assert t.remove([3, 70]) == 2
    assert 3 not in t and 70 not in t and len(t) == 98
    assert t.remove([3, 1000], missing_ok=True) == 0
    D, I = t.search(x[:100], 5)
    assert not np.isin(I, [3, 70]).any()
    # Bad input changes nothing.
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        t.add(bad, ids=[5, 200, 201])
    with pytest.raises(ValueError, match="expected dim 8, got 7"):
        t.add(x[:2, :7])
    with pytest.raises(ValueError, match="repeat"):
        t.add(x[:2], ids=[300, 300])
    with pytest.raises(TypeError, match="allow-list"):
        t.search(x[0], 3, filter=np.ones(98, bool))
    assert len(t) == 98 and np.allclose(t.get(5), x[5], atol=1e-6)
    D, I = t.search(x[:5], 3, filter=[1, 2, 65])
    assert set(I.ravel().tolist()) <= {1, 2, 65}


def test_untrained_ivf_main_is_trained_by_the_merge():
    x = unit(clustered(500, 16, seed=4))
    ivf = pyknn.IVFFlatIndex(16, nlist=8, metric="cosine", nprobe=8)
    t = TieredIndex(ivf, auto_merge=None)
    t.add(x[:5])
    with pytest.raises(ValueError, match="at least 8 vectors"):
        t.merge()
    assert (len(t), t.fresh_size) == (5, 5)
    t.add(x[5:])
    t.merge()
    assert ivf.is_trained and len(ivf) == 500 and t.fresh_size == 0
    assert t.search(x[7], 1)[1][0, 0] == 7


def test_auto_merge_sync_and_background():
    x = unit(clustered(400, 8, seed=5))
    t = TieredIndex(pyknn.FlatIndex(8, "cosine"), merge_threshold=100, auto_merge="sync")
    t.add(x[:99])
    assert t.fresh_size == 99
    t.add(x[99:150])
    assert (t.fresh_size, len(t.main)) == (0, 150)
    b = TieredIndex(pyknn.HNSWIndex(8, metric="cosine"), merge_threshold=100)
    b.add(x[:250])
    b.wait_merge()
    assert b.fresh_size == 0 and len(b.main) == 250 and len(b) == 250


def test_failed_merge_restores_the_fresh_tier(monkeypatch):
    x = unit(clustered(200, 8, seed=6))
    main = pyknn.FlatIndex(8, "cosine")
    t = TieredIndex(main, auto_merge=None)
    t.add(x)
    calls = {"n": 0}
    real_add = pyknn.FlatIndex.add

    def failing_add(self, *a, **kw):
        if self is main:
            calls["n"] += 1
            raise MemoryError("simulated")
        return real_add(self, *a, **kw)

    monkeypatch.setattr(pyknn.FlatIndex, "add", failing_add)
    with pytest.raises(MemoryError):
        t.merge()
    monkeypatch.undo()
    assert calls["n"] == 1 and len(t) == 200 and t.fresh_size == 200 and len(main) == 0
    assert sorted(t.ids.tolist()) == list(range(200))


def test_save_load_keeps_both_tiers(tmp_path):
    x = unit(clustered(300, 8, seed=7))
    t = TieredIndex(pyknn.HNSWIndex(8, metric="ip"), merge_threshold=1000, auto_merge=None)
    t.add(x[:200], model_id="m@1")
    t.merge()
    t.add(x[200:])
    t.remove([10, 250])
    t.save(tmp_path / "t.pyknn")
    assert [p.name for p in tmp_path.iterdir()] == ["t.pyknn"]  # no temporary left behind
    u = TieredIndex.load(tmp_path / "t.pyknn")
    assert (len(u), u.fresh_size, len(u.main), u.model_id) == (298, 99, 199, "m@1")
    for a, b in zip(t.search(x[:20], 10), u.search(x[:20], 10)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(pyknn.ModelMismatchError):
        u.search(x[:2], 3, model_id="other@1")
    u.add(x[0])
    assert u.ids.max() == 300  # default ids continue
    v = pickle.loads(pickle.dumps(t))
    assert len(v) == 298
    data = (tmp_path / "t.pyknn").read_bytes()
    (tmp_path / "bad").write_bytes(data[:-100])
    with pytest.raises(pyknn.FormatError):
        TieredIndex.load(tmp_path / "bad")
    (tmp_path / "bad").write_bytes(b"garbage" * 10)
    with pytest.raises(pyknn.FormatError, match="magic"):
        TieredIndex.load(tmp_path / "bad")


def test_guard_and_norms_checked_once():
    t = TieredIndex(pyknn.FlatIndex(4, "ip"), auto_merge=None)
    with pytest.warns(pyknn.NormWarning) as rec:
        t.add(np.ones((3, 4)), model_id="a@1")
    assert len(rec) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the merge copies checked vectors: no second warning
        t.merge()
    with pytest.raises(pyknn.ModelMismatchError):
        t.add(np.eye(4), model_id="b@1")
    assert t.main.model_id == "a@1" and len(t) == 3


# ------------------------------------------------------------------------- concurrency
def _check_row(I, D, pad=-np.inf):
    valid = I[I != -1]
    assert valid.size == np.unique(valid).size, f"duplicate id in a result row: {I}"


@pytest.mark.parametrize("rounds", [8])
def test_background_merges_never_lose_or_duplicate(rounds, monkeypatch):
    """Readers search while merges run and a writer adds, replaces and removes documents.

    Stable documents (never touched by the writer) must always be found by their own vector,
    at rank 1, exactly once; no result row may hold an id twice."""
    import pyknn.rag.tiered as tiered
    monkeypatch.setattr(tiered, "_MERGE_CHUNK", 8)  # many small steps: more interleaving
    dim = 16
    rng = np.random.default_rng(11)
    stable = unit(rng.standard_normal((300, dim)))
    extra = unit(rng.standard_normal((rounds * 400, dim)))
    t = TieredIndex(pyknn.FlatIndex(dim, "cosine"), auto_merge=None)
    t.add(stable, ids=np.arange(300))
    errors, stop = [], threading.Event()

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                pick = r.choice(300, 16, replace=False)
                D, I = t.search(stable[pick], 8)
                for row_d, row_i in zip(D, I):
                    _check_row(row_i, row_d)
                assert (I[:, 0] == pick).all(), f"lost a document: {pick} -> {I[:, 0]}"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for th in readers:
        th.start()
    try:
        live = set(range(300))
        next_id = 1000
        overlapped = 0
        for r in range(rounds):
            batch = extra[r * 400:(r + 1) * 400]
            t.add(batch[:300], ids=np.arange(next_id, next_id + 300))
            live.update(range(next_id, next_id + 300))
            th = t.merge(background=True)
            overlapped += t.merging
            # Writes while the merge runs: new ids, replacements of ids being merged, removals.
            t.add(batch[300:350], ids=np.arange(next_id + 300, next_id + 350))
            live.update(range(next_id + 300, next_id + 350))
            t.add(batch[350:400], ids=np.arange(next_id, next_id + 50))  # replace 50 being merged
            t.remove(np.arange(next_id + 50, next_id + 80))
            live.difference_update(range(next_id + 50, next_id + 80))
            th.join()
            t.wait_merge()
            assert len(t) == len(live), (len(t), len(live))
            assert set(t.ids.tolist()) == live
            np.testing.assert_allclose(t.get(np.arange(next_id, next_id + 50)), batch[350:400],
                                       atol=1e-6)
            next_id += 1000
            if errors:
                break
    finally:
        stop.set()
        for th in readers:
            th.join()
    if errors:
        raise errors[0]
    assert overlapped > 0, "no write ran while a merge did: the test proved nothing"
    t.merge()
    assert t.fresh_size == 0 and len(t.main) == len(live)
    # After all merges, the main index alone holds exactly the live set, each id once.
    assert sorted(t.main.ids.tolist()) == sorted(live)


def test_writes_in_the_middle_of_a_merge(monkeypatch):
    """Pause a merge after its first chunk reached main, write, and check what readers see."""
    import pyknn.rag.tiered as tiered
    monkeypatch.setattr(tiered, "_MERGE_CHUNK", 50)
    x = unit(clustered(400, 8, seed=8))
    main = pyknn.FlatIndex(8, "cosine")
    t = TieredIndex(main, auto_merge=None)
    t.add(x[:200])
    copied, resume = threading.Event(), threading.Event()
    real_add = pyknn.FlatIndex.add

    def slow_add(self, *a, **kw):
        out = real_add(self, *a, **kw)
        if self is main:
            copied.set()
            assert resume.wait(30)
        return out

    monkeypatch.setattr(pyknn.FlatIndex, "add", slow_add)
    th = t.merge(background=True)
    assert copied.wait(30)
    assert len(main) == 50  # ids 0..49 are in main *and* in the frozen tier
    t.remove([3, 120])                                   # one copied already, one not
    t.add(np.stack([x[300], x[301]]), ids=[4, 130])      # replacements of both kinds
    t.add(x[350], ids=[999])
    live = {i: x[i] for i in range(200) if i not in (3, 120)}
    live[4], live[130], live[999] = x[300], x[301], x[350]
    ref = reference(live)
    for q in (x[:60], x[300:302], x[3:4], x[120:121]):
        same_results(t.search(q, 15), ref.search(q, 15))
    assert len(t) == len(live) and set(t.ids.tolist()) == set(live)
    assert 3 not in t and 120 not in t and 4 in t
    resume.set()
    th.join()
    t.wait_merge()
    monkeypatch.undo()
    same_results(t.search(x[:60], 15), ref.search(x[:60], 15))
    # main holds the merged documents, without the removed or replaced old copies.
    assert set(main.ids.tolist()) == set(range(200)) - {3, 120, 4, 130}
    assert set(t.ids.tolist()) == set(live) and len(t) == len(live)


class WriterMain:
    """A main index whose writes (add, remove) share one writer lock, like HNSW's write mutex.

    With ``block`` set, add holds the writer until ``release`` is set (a long chunk insertion);
    remove fails at once instead of waiting for a held writer (so a test shows who would wait).
    ``fail_add`` / ``fail_remove`` make those calls raise.
    """

    def __init__(self, dim):
        self._idx = pyknn.FlatIndex(dim)
        self.writer = threading.Lock()
        self.adding, self.release = threading.Event(), threading.Event()
        self.block = False
        self.fail_add = self.fail_remove = False
        self.adds = 0

    dim = property(lambda self: self._idx.dim)
    metric = property(lambda self: self._idx.metric)
    metadata = property(lambda self: self._idx.metadata)
    ids = property(lambda self: self._idx.ids)

    def __len__(self):
        return len(self._idx)

    def contains(self, id):
        return self._idx.contains(id)

    __contains__ = contains

    def get(self, ids):
        return self._idx.get(ids)

    def search(self, q, k, filter=None, **kw):
        return self._idx.search(q, k, filter=filter, **kw)

    def memory_usage(self):
        return self._idx.memory_usage()

    def add(self, x, ids):
        with self.writer:
            self.adds += 1
            if self.block:
                self.adding.set()
                assert self.release.wait(60)
            if self.fail_add and (self.fail_add is True or self.adds >= self.fail_add):
                raise RuntimeError("main refuses the add")
            self._idx.add(x, ids)

    def remove(self, ids, missing_ok=False):
        if self.fail_remove:
            raise RuntimeError("main refuses the remove")
        if not self.writer.acquire(blocking=False):
            raise AssertionError("main.remove would wait for main's writer")
        try:
            return self._idx.remove(ids, missing_ok)
        finally:
            self.writer.release()


def test_writes_during_a_merge_never_wait_for_mains_writer():
    """While a merge holds main's writer (inserting a chunk), adds, removes and searches go on:
    none of them waits for main's writer, and the newest versions win afterwards."""
    x = unit(np.random.default_rng(5).standard_normal((102, 16)))
    main = WriterMain(16)
    t = TieredIndex(main, auto_merge=None)
    t.add(x[:50], np.arange(50))
    t.merge()
    t.add(x[50:100], np.arange(50, 100))
    main.block = True
    th = t.merge(background=True)
    try:
        assert main.adding.wait(60)  # the merge now holds main's writer
        t.add(x[100:101], [3])       # replaces an id of main
        t.add(x[101:102], [60])      # replaces an id being merged
        assert t.remove([4, 70]) == 2
        assert len(t) == 98 and 3 in t and 4 not in t and 70 not in t
        D, I = t.search(x[100:102], k=5)
        assert I[0, 0] == 3 and I[1, 0] == 60 and D[0, 0] == pytest.approx(1, abs=1e-5)
        assert all(np.unique(r[r >= 0]).size == (r >= 0).sum() for r in I)
    finally:
        main.release.set()
        th.join(60)
    assert t.wait_merge() is True
    expect = sorted(set(range(100)) - {4, 70})
    assert sorted(t.ids.tolist()) == expect and len(t) == 98
    np.testing.assert_allclose(t.get([3, 60]), x[100:102], atol=1e-6)
    # Tombstones were applied to main by the merge.
    assert 4 not in main and 70 not in main and t.fresh_size == 2
    D, I = t.search(x[:100], k=3)
    assert all(np.unique(r[r >= 0]).size == (r >= 0).sum() for r in I)


def test_read_only_main_is_rejected(tmp_path):
    h = pyknn.HNSWIndex(16)
    h.add(unit(np.random.default_rng(0).standard_normal((20, 16))))
    h.save(tmp_path / "h.pyknn")
    ro = pyknn.load(tmp_path / "h.pyknn", mmap=True)
    assert ro.read_only
    with pytest.raises(ValueError, match="read-only"):
        TieredIndex(ro)


def test_failing_main_leaves_the_tiered_index_unchanged(monkeypatch):
    monkeypatch.setattr("pyknn.rag.tiered._MERGE_CHUNK", 10)
    x = unit(np.random.default_rng(6).standard_normal((80, 16)))
    main = WriterMain(16)
    t = TieredIndex(main, auto_merge=None)
    t.add(x[:30], np.arange(30))
    t.merge()
    main.fail_remove = True
    # Replacing / removing ids of main needs no main.remove: they succeed.
    t.add(x[30:31], [5])
    assert t.remove([6]) == 1
    assert len(t) == 29 and 6 not in t
    np.testing.assert_allclose(t.get(5), x[30], atol=1e-6)
    # A merge that cannot drop main's stale copies fails before changing anything.
    with pytest.raises(RuntimeError, match="refuses the remove"):
        t.merge()
    assert t.fresh_size == 1 and len(t) == 29 and t.main is main
    # A merge whose add fails half-way (second chunk), with main.remove failing too: the
    # fresh tier comes back whole; the copied chunk stays hidden in main.
    main.fail_remove = False
    t.merge()
    t.add(x[40:80], np.arange(40, 80))
    before = sorted(t.ids.tolist())
    main.fail_add, main.adds, main.fail_remove = 2, 0, True
    with pytest.raises(RuntimeError, match="refuses the add"):
        t.merge()
    assert t.fresh_size == 40 and len(t) == len(before) and sorted(t.ids.tolist()) == before
    D, I = t.search(x[40:80], k=3)
    assert I[:, 0].tolist() == list(range(40, 80))
    assert all(np.unique(r[r >= 0]).size == (r >= 0).sum() for r in I)
    # Once main works again, a merge moves everything and cleans main up.
    main.fail_add, main.fail_remove = False, False
    t.merge()
    assert t.fresh_size == 0 and sorted(t.ids.tolist()) == before
    assert sorted(main.ids.tolist()) == before and len(t) == len(before)


def test_contains_get_and_wait_merge_types():
    t = TieredIndex(pyknn.FlatIndex(16), auto_merge=None)
    x = unit(np.random.default_rng(7).standard_normal((5, 16)))
    t.add(x)
    for bad in ("3", 2.7, None):
        with pytest.raises(TypeError):
            t.contains(bad)
    assert 3 in t and np.int64(3) in t and not t.contains(2 ** 70)
    assert t.get(1).shape == (16,) and t.get(np.int64(1)).shape == (16,)
    assert t.get([1]).shape == (1, 16)
    assert t.wait_merge() is True and t.wait_merge(timeout=0.0) is True
    main = WriterMain(16)
    t = TieredIndex(main, auto_merge=None)
    t.add(x)
    main.block = True
    th = t.merge(background=True)
    try:
        assert main.adding.wait(60)
        assert t.wait_merge(timeout=0) is False
    finally:
        main.release.set()
    th.join(60)
    assert t.wait_merge() is True and len(main) == 5


def test_corrupted_tiered_files_raise_format_error():
    x = unit(np.random.default_rng(8).standard_normal((60, 16)))
    t = TieredIndex(pyknn.HNSWIndex(16), auto_merge=None)
    t.add(x[:40])
    t.merge()
    t.add(x[40:])
    t.remove([3, 45])
    data = t.to_bytes()
    u = TieredIndex.from_bytes(data)
    assert len(u) == 58 and u.fresh_size == 19
    header_end = data.index(b"}") + 1
    # Flipping bit 0 also turns digits of the header's counts into other digits.
    assert_damage_rejected(TieredIndex.from_bytes, data, pyknn.FormatError, flip=0x01,
                           always=range(header_end), cuts=(12, 30))
