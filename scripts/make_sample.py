#!/usr/bin/env python3
"""Build the bundled sample pyknn/data/wordnet-minilm-sample from the full wordnet-minilm folder.

Selection (all seeded with numpy.random.default_rng(SEED)):

1. 1,000 of the 10,000 queries: ``rng.choice(10000, 1000, replace=False)``, kept in
   their original order.
2. Documents: the judged-relevant document (qrels) of each chosen query, plus
   ``rng.choice`` of the remaining documents up to N in all; sorted by original
   id and renumbered 0..N-1; qrels remapped.
3. Exact top-100 inner-product ground truth on the sample, as in the source's
   README: float64 scores give candidates (everything within 1e-9 of the 100th
   best), which are re-scored exactly in int64 (float16 values times 2**24 are
   integers) and ordered by (-score, id). The result is checked against
   pyknn.evaluation.ground_truth.

Usage (from the repository root, with pyknn importable):

    python scripts/make_sample.py /work/shared/data/wordnet-minilm
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SEED = 0
N_QUERIES = 1_000
N_DOCS = 10_000
TOPK = 100
F16_SCALE = 2 ** 24  # float16 values of magnitude <= 2**5 are integer multiples of 2**-24
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pyknn" / "data" / "wordnet-minilm-sample"


def f16_to_int(a: np.ndarray) -> np.ndarray:
    """float16 -> exact int64 multiples of 2**-24 (asserts exactness)."""
    x = a.astype(np.float64) * F16_SCALE
    i = np.rint(x).astype(np.int64)
    assert np.array_equal(i.astype(np.float64), x), "float16 -> int64 not exact"
    return i


def exact_topk_ip(base16: np.ndarray, q16: np.ndarray, k: int, margin: float = 1e-9):
    """Exact top-k by inner product of float16 vectors, ties to the smaller id.

    Returns ids (nq, k) int32 and exact scores (nq, k) float64.
    """
    B = base16.astype(np.float64)
    Bi = f16_to_int(base16)
    Qi = f16_to_int(q16)
    S = q16.astype(np.float64) @ B.T
    kth = -np.partition(-S, k - 1, axis=1)[:, k - 1]
    ids = np.empty((len(q16), k), np.int32)
    scores = np.empty((len(q16), k), np.float64)
    for r in range(len(q16)):  # a few hundred candidates per query at most
        cand = np.flatnonzero(S[r] >= kth[r] - margin)
        exact = Bi[cand] @ Qi[r]  # |sum| < 384 * 2**48 < 2**63: exact
        order = np.lexsort((cand, -exact))[:k]
        ids[r] = cand[order]
        scores[r] = exact[order] / float(F16_SCALE) ** 2
    return ids, scores


def subset_jsonl(src: Path, dst: Path, keep_ids: np.ndarray, transform) -> int:
    """Copy the lines of src whose "id" is in keep_ids (sorted), transformed; return the count."""
    keep = set(int(i) for i in keep_ids)
    n = 0
    with gzip.open(src, "rt", encoding="utf-8") as fin, \
            gzip.GzipFile(dst, "wb", mtime=0) as fout:  # mtime=0: reproducible bytes
        for line in fin:
            rec = json.loads(line)
            if rec["id"] in keep:
                fout.write((json.dumps(transform(rec), ensure_ascii=False) + "\n").encode())
                n += 1
    return n


README = """\
# wordnet-minilm-sample

A small slice of the `wordnet-minilm` development benchmark, bundled with pyknn so that
examples, tests and `pyknn bench` run without downloads: {n_docs:,} WordNet 3.0 synsets and
{n_queries:,} short lemma queries embedded with sentence-transformers/all-MiniLM-L6-v2
(384-d, unit-normalised, float16), exact top-{k} inner-product ground truth and one judged-relevant
document per query. Metric: **inner product** (`info.json`).

Load it with `pyknn.datasets.load_sample()` (or `pyknn.datasets.load()`).

## Files

| file | shape | dtype | content |
| --- | --- | --- | --- |
| `base.f16.npy` | ({n_docs}, 384) | float16 | document vectors, row i = sample document id i |
| `queries.f16.npy` | ({n_queries}, 384) | float16 | query vectors |
| `gt_ids.i32.npy` | ({n_queries}, {k}) | int32 | exact top-{k} sample document ids per query, best first |
| `qrels.i32.npy` | ({n_queries},) | int32 | the judged-relevant sample document of each query |
| `docs.jsonl.gz` | {n_docs} lines | JSON | `{{"id", "orig_id", "text", "synset"}}` |
| `queries.jsonl.gz` | {n_queries} lines | JSON | `{{"id", "orig_id", "text", "relevant", "same_lemma_docs"}}`; ids are sample ids; `same_lemma_docs` keeps only the senses present in the sample |
| `info.json` | | | metric and provenance |

## How it was made

Source: the full `wordnet-minilm` folder (117,659 documents, 10,000 queries; its README
describes the corpus, the model and the queries). Command, from the repository root:

    python scripts/make_sample.py /path/to/wordnet-minilm

1. `rng = numpy.random.default_rng({seed})`; `rng.choice(10000, {n_queries}, replace=False)`
   picks the queries, kept in their original order (`orig_id`).
2. Documents: the judged-relevant document of every chosen query ({n_rel:,} documents), plus
   `rng.choice` (same generator, without replacement) of {n_other:,} of the other documents;
   sorted by original id and renumbered 0..{last}. qrels are remapped to the new ids.
3. Ground truth recomputed on the sample exactly as for the full data: float64 scores of
   the float16 vectors give candidates (every document within 1e-9 of the {k}th best), which
   are re-scored exactly in int64 (each float16 value times 2**24 is an integer) and ordered
   by (-score, id): ties go to the smaller id. `pyknn.evaluation.ground_truth(base, queries,
   {k}, "ip")` reproduces `gt_ids` exactly (checked by the script and by the tests).

Sanity numbers (exact search on the sample): the judged document is rank 1 for
{r1:.1%} of the queries, in the top 10 for {r10:.1%}; MRR@{k} = {mrr:.3f}. (Higher than on the
full data, 49.0 % / 83.6 % / 0.611, because the sample has about 12 times fewer distractors:
use the full data for realistic retrieval-quality figures.)

## Licences

* Document texts and the vectors derived from them: WordNet 3.0, Princeton University,
  under the WordNet licence below (text from Debian's `wordnet-base` 1:3.0-37,
  `/usr/share/doc/wordnet-base/copyright`).
* Embedding model sentence-transformers/all-MiniLM-L6-v2: Apache-2.0.

WordNet licence:

    This software and database is being provided to you, the LICENSEE, by
    Princeton University under the following license.  By obtaining, using
    and/or copying this software and database, you agree that you have
    read, understood, and will comply with these terms and conditions.:

    Permission to use, copy, modify and distribute this software and
    database and its documentation for any purpose and without fee or
    royalty is hereby granted, provided that you agree to comply with
    the following copyright notice and statements, including the disclaimer,
    and that the same appear on ALL copies of the software, database and
    documentation, including modifications that you make for internal
    use or for distribution.

    WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

    THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
    UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
    IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
    UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
    ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
    OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
    INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
    OTHER RIGHTS.

    The name of Princeton University or Princeton may not be used in
    advertising or publicity pertaining to distribution of the software
    and/or database.  Title to copyright in this software, database and
    any associated documentation shall at all times remain with
    Princeton University and LICENSEE agrees to preserve same.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="the full wordnet-minilm folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--n-docs", type=int, default=N_DOCS)
    ap.add_argument("--n-queries", type=int, default=N_QUERIES)
    ap.add_argument("--k", type=int, default=TOPK)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-texts", action="store_true", help="skip docs/queries.jsonl.gz")
    args = ap.parse_args(argv)

    src = args.source
    base = np.load(src / "base.f16.npy")
    queries = np.load(src / "queries.f16.npy")
    qrels = np.load(src / "qrels.i32.npy").astype(np.int64)

    rng = np.random.default_rng(args.seed)
    qsel = np.sort(rng.choice(len(queries), args.n_queries, replace=False))
    relevant = np.unique(qrels[qsel])
    if args.n_docs < relevant.size:
        sys.exit(f"--n-docs {args.n_docs} < {relevant.size} judged-relevant documents")
    others = np.setdiff1d(np.arange(len(base)), relevant, assume_unique=True)
    extra = rng.choice(others, args.n_docs - relevant.size, replace=False)
    docs = np.sort(np.concatenate([relevant, extra]))  # sample id -> original id
    new_id = np.full(len(base), -1, np.int64)  # original id -> sample id
    new_id[docs] = np.arange(docs.size)

    s_base = np.ascontiguousarray(base[docs])
    s_queries = np.ascontiguousarray(queries[qsel])
    s_qrels = new_id[qrels[qsel]]
    assert (s_qrels >= 0).all()
    gt_ids, _ = exact_topk_ip(s_base, s_queries, args.k)

    # Independent check: the package's reference must agree exactly.
    from pyknn.evaluation import ground_truth, mrr_at_k, recall_at_k
    _, ref = ground_truth(s_base, s_queries, args.k, "ip")
    if not np.array_equal(ref, gt_ids):
        sys.exit(f"evaluation.ground_truth disagrees on {int((ref != gt_ids).any(1).sum())} queries")

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    np.save(out / "base.f16.npy", s_base)
    np.save(out / "queries.f16.npy", s_queries)
    np.save(out / "gt_ids.i32.npy", gt_ids.astype(np.int32))
    np.save(out / "qrels.i32.npy", s_qrels.astype(np.int32))

    if not args.no_texts:
        n = subset_jsonl(src / "docs.jsonl.gz", out / "docs.jsonl.gz", docs,
                         lambda r: {"id": int(new_id[r["id"]]), "orig_id": r["id"],
                                    "text": r["text"], "synset": r["synset"]})
        assert n == docs.size
        qpos = {int(q): j for j, q in enumerate(qsel)}
        n = subset_jsonl(src / "queries.jsonl.gz", out / "queries.jsonl.gz", qsel,
                         lambda r: {"id": qpos[r["id"]], "orig_id": r["id"], "text": r["text"],
                                    "relevant": int(new_id[r["relevant"]]),
                                    "same_lemma_docs": [int(new_id[d]) for d in r["same_lemma_docs"]
                                                        if new_id[d] >= 0]})
        assert n == qsel.size

    info = {"name": "wordnet-minilm-sample", "metric": "ip", "source": "wordnet-minilm",
            "n_docs": int(docs.size), "n_queries": int(qsel.size), "k": args.k, "seed": args.seed,
            "command": "python scripts/make_sample.py /path/to/wordnet-minilm"}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    gt_rel = gt_ids.astype(np.int64)
    (out / "README.md").write_text(README.format(
        n_docs=docs.size, n_queries=qsel.size, k=args.k, seed=args.seed, n_rel=relevant.size,
        n_other=extra.size, last=docs.size - 1,
        r1=recall_at_k(gt_rel[:, :1], s_qrels[:, None], 1),
        r10=recall_at_k(gt_rel[:, :10], s_qrels[:, None], 10),
        mrr=mrr_at_k(gt_rel, s_qrels, args.k)), encoding="utf-8")

    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {docs.size} documents, {qsel.size} queries, {total:,} bytes")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:20s} {f.stat().st_size:>10,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
