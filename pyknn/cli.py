"""The ``pyknn`` command: ``pyknn bench`` (benchmark indexes on a dataset) and ``pyknn info``.

``benchmarks/compare.py`` builds on the same pieces (:func:`add_bench_arguments`,
:func:`run_bench`, :func:`guarded`), so both accept the same options and behave alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from . import _simd, bench, datasets
from ._version import __version__

__all__ = ["main", "Parser", "add_bench_arguments", "run_bench", "guarded"]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ("prog: error: ...") and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def add_bench_arguments(parser: argparse.ArgumentParser, default_data: Optional[str] = None,
                        compare_option: bool = True) -> None:
    """Add the benchmark options to ``parser``.

    ``default_data`` None means the bundled sample. Without ``compare_option`` the peers are
    always compared (``args.compare`` is True).
    """
    parser.add_argument("--data", metavar="PATH", default=default_data,
                        help="dataset: a folder of .npy files or an ann-benchmarks .hdf5 file "
                             f"(default: {default_data or 'the bundled wordnet-minilm sample'})")
    parser.add_argument("--k", type=_count(1), default=10, help="neighbours per query (default 10)")
    parser.add_argument("--threads", type=_count(1), default=None,
                        help="threads for every library (default: all cores)")
    parser.add_argument("--queries", type=_count(1), default=None, metavar="N",
                        help="use the first N queries (default: all)")
    parser.add_argument("--repeats", type=_count(1), default=3,
                        help="batch QPS is the best of this many runs after a warm-up (default 3)")
    parser.add_argument("--single-queries", type=_count(0), default=200, metavar="N",
                        help="single-query latency over the first N queries; 0 skips it (default 200)")
    parser.add_argument("--index", action="append", metavar="NAME", dest="indexes",
                        help="index spec or family to run (repeatable; default: all of pyknn's). "
                             f"Registered: {', '.join(s.name for s in bench.registered_specs())}")
    if compare_option:
        parser.add_argument("--compare", action="store_true",
                            help="also run the peers (faiss, hnswlib, usearch) of the same families")
    else:
        parser.set_defaults(compare=True)
    parser.add_argument("--plot", metavar="FILE.png", help="draw recall vs QPS to this image")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to this file")


def check_output_path(path, option: str) -> None:
    """Fail early (before a long run) if ``path`` cannot be written: its folder must exist."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {Path(path).resolve().parent} does not exist")


def run_bench(args: argparse.Namespace) -> List[dict]:
    """Run the benchmark the parsed options ask for; print the table to stdout.

    Writes the JSON and the plot when asked. Progress and notes go to stderr.
    """
    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    if args.plot:
        bench.require_matplotlib()
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    dataset = datasets.load(args.data)
    specs, notes = bench.select_specs(args.indexes, compare=args.compare, metric=dataset.metric)
    for note in notes:
        print(note, file=sys.stderr)
    data = bench.prepare(dataset, n_queries=args.queries, k=args.k)
    del dataset
    results = bench.run(data, specs, k=args.k, threads=args.threads, repeats=args.repeats,
                        single_queries=args.single_queries)
    print(bench.format_table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return results


def _info(args) -> None:
    levels = ", ".join(_simd.available_simd_levels())
    print(f"pyknn {__version__}")
    print(f"SIMD level: {_simd.simd_level()} (available: {levels})")
    print(f"threads: {_simd.num_threads()}")
    print(f"CPU: {bench.cpu_model()} ({bench.default_threads()} cores available)")
    print(f"numpy: {np.__version__}")
    print(f"python: {platform.python_version()} ({platform.system()} {platform.machine()})")


def guarded(prog: str, action: Callable[[], object]) -> int:
    """Run ``action``; expected failures become one line on stderr and exit status 2."""
    try:
        action()
    except (OSError, ValueError, ImportError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> Parser:
    parser = Parser(prog="pyknn", description="pyknn: vector search benchmarks and information.")
    parser.add_argument("--version", action="version", version=f"pyknn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = commands.add_parser("bench", help="benchmark indexes on a dataset (default: the bundled sample)",
                            description="Build each index once, then measure recall@k, NDCG@10, "
                                        "MRR@10, batch QPS, single-query latency, build time and "
                                        "bytes per vector. The table goes to stdout, progress to stderr.")
    add_bench_arguments(b)
    b.set_defaults(action=run_bench)
    i = commands.add_parser("info", help="version, SIMD level, threads, CPU")
    i.set_defaults(action=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pyknn`` command; returns the exit status (0, or 2 on errors)."""
    parser = _parser()
    args = parser.parse_args(argv)
    return guarded(f"pyknn {args.command}", lambda: args.action(args))
