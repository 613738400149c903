"""`tokenprune build`: results JSON files to one CSV (tokenprune/cli/build.py). Plain Python."""
NAME = "build"
HELP = "collect results JSON files into one CSV"
DESCRIPTION = ("One CSV row per results JSON file of `tokenprune eval` (or CLIP_benchmark); "
               "nested fields such as `pruning` are JSON text, non-finite numbers empty.")


def add_arguments(parser):
    parser.add_argument("files", nargs="+", help="results JSON files, or folders of them")
    parser.add_argument("--output", default="benchmark.csv", help="CSV file (default %(default)s)")


def check(args, argv):
    """Nothing to check before reading the files: build_csv says what is wrong with one."""


def run(args, argv):
    from ..build import build_csv
    rows = build_csv(args.files, args.output)
    print(f"wrote {args.output} ({rows} rows)")
