"""The pyknn command (``python -m pyknn``) and the benchmark library behind it."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pyknn import bench
from pyknn.datasets import Dataset, sample_path

needs_sample = pytest.mark.skipif(not (sample_path() / "base.f16.npy").is_file(),
                                  reason="the bundled sample is not there")
FAST = ["--queries", "50", "--repeats", "1", "--single-queries", "10"]


def pyknn(*args, cwd):
    # Run outside the checkout so the installed package is imported, not the source tree.
    return subprocess.run([sys.executable, "-m", "pyknn", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def table_rows(stdout):
    """{index name: {column: cell}} from the text table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("index "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_info(tmp_path):
    r = pyknn("info", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^pyknn \d+\.\d+", r.stdout)
    assert "SIMD level:" in r.stdout and "numpy:" in r.stdout and "CPU:" in r.stdout


@needs_sample
def test_bench_on_the_sample(tmp_path):
    out = tmp_path / "results.json"
    r = pyknn("bench", *FAST, "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    row = rows["FlatIndex"]
    assert row["recall@10"] == "1.000"
    # IVF-PQ rows (8-bit and 4-bit fast scan, with and without re-ranking) with their size.
    for name in ("IVFPQIndex nbits=8", "IVFPQIndex nbits=4", "IVFPQIndex nbits=8 +rerank",
                 "IVFPQIndex nbits=4 +rerank"):
        assert float(rows[name]["bytes/vec"]) > 0, name
    assert float(rows["IVFPQIndex nbits=8"]["bytes/vec"]) < float(row["bytes/vec"]) / 4
    assert float(row["QPS (batch)"]) > 0
    assert "building FlatIndex" in r.stderr and "building" not in r.stdout
    header = r.stdout.splitlines()[0]
    assert "wordnet-minilm-sample" in header and "nq=50" in header and "metric=ip" in header
    results = json.loads(out.read_text())
    assert results[0]["index"] == "FlatIndex"
    ivf = [x for x in results if x["index"] == "IVFFlatIndex"]
    assert len(ivf) >= 3
    recalls = [x["recall"] for x in ivf]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # the last setting probes every cell
    assert results[0]["recall"] == 1.0 and results[0]["nq"] == 50 and results[0]["k"] == 10
    assert results[0]["ndcg"] is not None and results[0]["p99_ms"] >= results[0]["p50_ms"]


@pytest.mark.parametrize("args, message", [
    (["bench", "--data", "no/such/folder"], "no/such/folder"),
    (["bench", "--k", "0"], "--k"),
    (["bench", "--bogus"], "--bogus"),
    (["bench", "--index", "NoSuchIndex"], "NoSuchIndex"),
    (["bench", "--json", "no/such/folder/r.json"], "--json"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, args, message):
    r = pyknn(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- the library
@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 16)).astype(np.float16)
    queries = rng.standard_normal((20, 16)).astype(np.float16)
    return Dataset(name="tiny", base=base, queries=queries, qrels=np.arange(20), metric="l2")


def test_run_computes_missing_ground_truth_and_formats(tiny):
    results = bench.run(tiny, k=5, threads=1, repeats=1, single_queries=3, progress=False)
    assert results[0]["index"] == "FlatIndex" and results[0]["recall"] == 1.0
    json.dumps(results, allow_nan=False)
    text = bench.format_table(results)
    assert "recall@5" in text and "dataset tiny: n=500 dim=16 nq=20 metric=l2" in text
    assert "FlatIndex" in bench.format_markdown(results, command="pyknn bench")


def test_a_registered_spec_adds_rows_for_its_sweep(tiny, tmp_path):
    def build(data, threads, boost):
        return bench.get_spec("FlatIndex").build_index(data, threads)

    def search(index, queries, k, threads, shift):
        return index.search(queries, k)[1]

    spec = bench.IndexSpec(name="test-sweep", family="Flat", build=build, params={"boost": 2},
                           settings=[{"shift": s} for s in (1, 2, 3)], search=search)
    bench.register(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            bench.register(spec)
        specs, _ = bench.select_specs(["test-sweep"])
        results = bench.run(tiny, specs, k=3, threads=1, repeats=1, single_queries=0, progress=False)
    finally:
        bench._SPECS.pop("test-sweep")
    assert [r["params"] for r in results] == [{"boost": 2, "shift": s} for s in (1, 2, 3)]
    assert all(r["p50_ms"] is None for r in results)
    pytest.importorskip("matplotlib")
    bench.plot(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_select_specs():
    names = [s.name for s in bench.select_specs()[0]]
    assert names == [s.name for s in bench.registered_specs() if not s.peer]
    with_peers, _ = bench.select_specs(["Flat"], compare=True, metric="ip")
    assert "FlatIndex" in [s.name for s in with_peers]
    assert all(s.family == "Flat" and "ip" in s.metrics for s in with_peers)
    assert "faiss IndexFlatL2" not in [s.name for s in with_peers]
    with pytest.raises(ValueError, match="unknown index"):
        bench.select_specs(["nope"])


def test_qps_ratios():
    rows = [{"index": "FlatIndex", "library": "pyknn", "family": "Flat", "qps": 300.0, "recall": 1.0},
            {"index": "faiss IndexFlatIP", "library": "faiss", "family": "Flat", "qps": 100.0,
             "recall": 1.0}]
    (r,) = bench.qps_ratios(rows)
    assert r["peer"] == "faiss IndexFlatIP" and r["ratio"] == pytest.approx(3.0)


def test_qps_at_recall_interpolates_on_the_curve():
    rows = [{"recall": 0.90, "qps": 100.0}, {"recall": 0.96, "qps": 50.0}, {"recall": 0.99, "qps": 20.0}]
    # Halfway in recall between 0.90 and 0.96 is halfway in log(QPS): the geometric mean.
    assert bench.qps_at_recall(rows, 0.93) == pytest.approx((100.0 * 50.0) ** 0.5)
    assert bench.qps_at_recall(rows, 0.96) == pytest.approx(50.0)
    assert bench.qps_at_recall(rows, 0.50) == pytest.approx(100.0)  # the lowest setting already
    assert bench.qps_at_recall(rows, 0.995) is None
