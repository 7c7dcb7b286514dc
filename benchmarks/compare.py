"""pyknn side by side with faiss, hnswlib and usearch on the full wordnet-minilm data.

One run, one process, the same thread count for every library; peers that are not installed
are skipped with a note (``pip install 'pyknn[bench]'`` installs them all). The measurement is
pyknn.bench's (the same as ``pyknn bench --compare``); this script adds the default data set
and ``--markdown``, which appends a section for BENCHMARKS.md with the command, date, CPU,
threads, batch size, the table and the ratios of pyknn's QPS to each peer's.

    python benchmarks/compare.py --threads 2 --queries 1000 --markdown BENCHMARKS.md
"""
import shlex
import sys
from pathlib import Path

from pyknn import bench, cli

#: The full data set, in shared/ beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/wordnet-minilm"


def _command(argv):
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script)] + list(argv))


def main(argv=None) -> int:
    """Run the comparison; returns the exit status (2 on errors, with a one-line message)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = cli.Parser(prog="compare.py", description=__doc__.split("\n\n")[0])
    cli.add_bench_arguments(parser, default_data=str(DEFAULT_DATA), compare_option=False)
    parser.add_argument("--markdown", metavar="FILE",
                        help="append the results as a markdown section to FILE")
    args = parser.parse_args(argv)

    def compare():
        cli.check_output_path(args.markdown, "--markdown")
        results = cli.run_bench(args)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as f:
                f.write("\n" + bench.format_markdown(results, command=_command(argv)))
            print(f"appended to {args.markdown}", file=sys.stderr)

    return cli.guarded(parser.prog, compare)


if __name__ == "__main__":
    sys.exit(main())
