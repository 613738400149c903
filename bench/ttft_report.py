"""The rows of bench/bench_ttft.py: pytest-benchmark JSON -> a markdown table.

    python -m pytest bench/bench_ttft.py --benchmark-only --benchmark-json OUT.json
    python bench/ttft_report.py OUT.json [more.json ...]

Per run, model, batch and provider, from the medians: time to first token (ttft), the speed-up over
unpruned, the ceiling that the token counts allow (unpruned ttft / (unpruned vision + the
language model's prefill at the provider's prompt length)), the speed-up as a fraction of it,
the selection's share of the vision tower's time (pruned vision / unpruned vision - 1; where
the selection was timed inside the tower, extra_info selection_s, its share of the unpruned
tower first), and the
peak memory of one ttft against unpruned. Rows pruned inside the tower (`layer`): the ceiling
is unpruned ttft / (their vision - their selection + the language model's prefill), the
selection timed inside their vision runs (extra_info selection_s), its share of their vision
time, and their vision time against unpruned; their language model's time is the row of the
same ratio without `layer` where they have none of their own.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py

from report import read_rows  # noqa: E402


def report(paths):
    lines = ["| run | model | batch | provider | image tokens | ttft (ms) | speed-up | ceiling | "
             "of ceiling | selection / vision | peak memory vs unpruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = read_rows(path, kinds=("ttft", "qwen_vl"))  # "qwen_vl": the runs before LLaVA's
        at = {(r.get("model"), r["batch"], r["ratio"], r.get("layer"), r["measure"]): r
              for r in rows}
        for model, batch in sorted({(r.get("model"), r["batch"]) for r in rows}):
            base = {m: at.get((model, batch, None, None, m)) for m in ("ttft", "vision", "lm")}
            if None in base.values():
                continue
            settings = sorted({(r["ratio"], r.get("layer")) for r in rows
                               if (r.get("model"), r["batch"]) == (model, batch)},
                              key=lambda s: (-(s[0] or 2), s[1] is not None, s[1] or 0))
            for ratio, layer in settings:
                ttft, vision, lm = (at.get((model, batch, ratio, layer, m))
                                    for m in ("ttft", "vision", "lm"))
                if ttft is None:
                    continue
                lm = lm or at.get((model, batch, ratio, None, "lm"))
                speed = base["ttft"]["median_s"] / ttft["median_s"]
                name = "unpruned" if ratio is None else f"ratio {ratio}"
                cells = [f"{Path(path).name}", str(model), str(batch),
                         name if layer is None else f"{name}, layer {layer}",
                         str(ttft["image_tokens"]), f"{ttft['median_s'] * 1000:,.1f}"]
                memory = (ttft.get("peak_mem_bytes") or 0) / max(
                    1, base["ttft"].get("peak_mem_bytes") or 0)
                if ratio is None or lm is None or vision is None:
                    cells += ["1.00x", "-", "-", "-", "1.00"]
                elif layer is not None:
                    select = vision.get("selection_s") or 0.0
                    ceiling = base["ttft"]["median_s"] / (vision["median_s"] - select
                                                         + lm["median_s"])
                    tower = vision["median_s"] / base["vision"]["median_s"]
                    cells += [f"{speed:.2f}x", f"{ceiling:.2f}x", f"{speed / ceiling:.0%}",
                              f"{select / vision['median_s']:.1%} (tower {tower:.2f}x)",
                              f"{memory:.2f}"]
                else:
                    ceiling = base["ttft"]["median_s"] / (base["vision"]["median_s"]
                                                         + lm["median_s"])
                    overhead = vision["median_s"] / base["vision"]["median_s"] - 1
                    share = f"{overhead:+.1%}"
                    if vision.get("selection_s"):  # timed inside: its share of the tower
                        share = (f"{vision['selection_s'] / base['vision']['median_s']:.1%} "
                                 f"(tower {overhead:+.1%})")
                    cells += [f"{speed:.2f}x", f"{ceiling:.2f}x", f"{speed / ceiling:.0%}",
                              share, f"{memory:.2f}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    print(report(parser.parse_args(argv).json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
