"""The LLaVA rows of bench/bench_vlm.py: pytest-benchmark JSON -> bench/vlm.md, whose body
bench/report.py appends to bench/RESULTS.md.

    pytest bench/bench_vlm.py --benchmark-only --benchmark-json bench/results/vlm_cpu.json
    python bench/vlm_report.py bench/results/vlm_cpu.json [more.json ...]

One section per run (JSON file). Within a run and batch: prefill speed-up = the unpruned
prefill time / the row's; ours vs baseline = the baseline's time / ours at the same k + m
(the ratio of images/s, and of tokens/s for decoding); peak memory against the unpruned row.
Ratios are given from the median of the rounds and, in brackets, from the fastest round: on a
shared machine the median carries other tenants' load, the fastest round less of it.
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/report.py, also when this file is loaded by path

from report import MIB, fmt, run_line, table  # noqa: E402
from report import read_rows as report_rows  # noqa: E402
ORDER = {"unpruned": 0, "ours": 1, "baseline": 2}
TITLE = "# LLaVA with fewer image tokens: measured"


def read_rows(path):
    """The LLaVA rows (extra_info kind "vlm") of a pytest-benchmark JSON file."""
    return report_rows(path, kinds=("vlm",))


def ratio(numerator, denominator, stat):
    if numerator is None or denominator is None:
        return None
    return numerator[stat] / denominator[stat]


def both(numerator, denominator):
    """"2.10x (2.50x)": the ratio of medians, then of the fastest rounds; "-" without a pair."""
    median = ratio(numerator, denominator, "median_s")
    if median is None:
        return "-"
    return f"{median:.2f}x ({ratio(numerator, denominator, 'min_s'):.2f}x)"


def mib(row):
    return fmt(None if row is None or row.get("peak_mem_bytes") is None
               else row["peak_mem_bytes"] / MIB, ",.1f", "-")


def mem_ratio(row, base):
    if row is None or base is None or not base.get("peak_mem_bytes") or row.get(
            "peak_mem_bytes") is None:
        return "-"
    return f"{row['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}"


def section(rows):
    """The markdown of one run's rows."""
    first = rows[0]
    by = {(r["measure"], r["batch"], r["provider"], r["image_tokens"]): r for r in rows}
    out = [f"## {first['device']}: {first['dtype']}, LLaVA configuration \"{first['llava']}\"",
           "", f"- {run_line(first)}",
           f"- {first['image_tokens_unpruned']} image tokens per image unpruned, "
           f"{first['text_tokens']} text tokens, k = {next((r['k'] for r in rows if r['k']), '-')}"
           f" anchors; decoding: {first['decode_steps']} steps; the baseline runs the language "
           "model at batch 1.", ""]
    header = ["batch", "provider", "image tokens", "prefill ms, median (fastest)",
              "prefill speed-up vs unpruned", "images/s vs baseline", "decode tokens/s",
              "decode vs baseline", "peak MiB", "peak vs unpruned"]
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        unpruned = next((r for r in rows if r["measure"] == "prefill" and r["batch"] == batch
                         and r["provider"] == "unpruned"), None)
        for row in sorted((r for r in rows if r["batch"] == batch and r["measure"] == "prefill"),
                          key=lambda r: (r["provider"] != "unpruned", r["image_tokens"],
                                         ORDER[r["provider"]])):
            provider, tokens = row["provider"], row["image_tokens"]
            decode = by.get(("decode", batch, provider, tokens))
            baseline = by.get(("prefill", batch, "baseline", tokens))
            baseline_decode = by.get(("decode", batch, "baseline", tokens))
            lines.append([
                batch, provider, tokens,
                f"{row['median_s'] * 1e3:,.1f} ({row['min_s'] * 1e3:,.1f})",
                both(unpruned, row) if provider != "unpruned" else "1.00x",
                both(baseline, row) if provider == "ours" else "-",
                fmt(decode and decode.get("tokens_per_s"), ",.1f", "-"),
                both(baseline_decode, decode) if provider == "ours" and decode else "-",
                mib(row), mem_ratio(row, unpruned)])
    return out + table(header, lines)


def render(paths, notes=()):
    out = [TITLE, "",
           "Written by `python bench/vlm_report.py` from `pytest bench/bench_vlm.py "
           "--benchmark-only --benchmark-json=FILE` (how each row is measured: the docstring of "
           "bench/bench_vlm.py). Random weights; speed does not depend on them. Ratios: from "
           "the medians of the rounds, and in brackets from the fastest rounds. Peak memory: "
           "one prefill and its decoding, above what was allocated before (weights and inputs "
           "excluded); on the CPU as torch's allocator reports it to torch.profiler "
           "(bench/conftest.py, `peak_memory`)."]
    out += [line for note in notes for line in ("", note)]
    for path in paths:
        rows = read_rows(path)
        if rows:
            out += [""] + section(rows)
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files of bench_vlm.py")
    parser.add_argument("--out", default=HERE / "vlm.md", type=Path)
    parser.add_argument("--note", action="append", default=[],
                        help="a paragraph for the top of the page (how the runs were made)")
    args = parser.parse_args(argv)
    args.out.write_text(render(args.json, args.note), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
