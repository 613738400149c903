"""The results page: pytest-benchmark JSON files -> bench/RESULTS.md and bench/speedup.png.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json bench/results/gpu.json

One section per device and dtype, so that runs on different machines never mix. Times are
the median over a benchmark's rounds; images/s = batch / median. A speedup compares two rows
of the same run (JSON file), model (or token count), batch and dtype: end to end against the
unpatched model, selection alone against the seed's hook baseline. The target checks are
printed and written at the top of the page.
"""
import argparse
import json
import operator
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2 ** 20
E2E_ORDER = {"unpatched": 0, "pruned": 1, "pruned-reference": 2}
LAYER_ORDER = {None: 0, "last": 1, "middle": 2}
SELECTION_ORDER = {"hook": 0, "reference": 1, "triton": 2, "qkv": 3}

# The targets of issue 5 (benchmarks, not assertions). `where` picks the rows a target is
# about; every matching row is checked against `bound` on `metric`.
CPU_B16 = dict(kind="e2e", device_type="cpu", model="ViT-B-16", batch=16, dtype="float32",
               provider="pruned", k=10, m=50)
GPU_E2E = dict(kind="e2e", device_type="cuda", dtype="float16", provider="pruned", k=10, m=50)
TARGETS = [
    ("CPU, ViT-B/16, batch 16, float32, k=10, m=50: pruned at the last block, "
     "images/s vs unpatched",
     dict(CPU_B16, layer_choice="last"), "speedup", ">=", 1.0),
    ("CPU, ViT-B/16, batch 16, float32, k=10, m=50: pruned at layer 6, images/s vs unpatched",
     dict(CPU_B16, layer=6), "speedup", ">=", 1.45),
    ("GPU, float16: Triton selection vs the hook baseline at T=577, B=256",
     dict(kind="selection", device_type="cuda", dtype="float16", provider="triton", tokens=577,
          batch=256), "speedup", ">=", 20.0),
    ("GPU, float16, k=10, m=50: pruned peak memory / unpatched peak memory",
     GPU_E2E, "mem_ratio", "<=", 1.0),
    ("GPU, float16, k=10, m=50: pruned at the last block, images/s vs unpatched",
     dict(GPU_E2E, layer_choice="last"), "speedup", ">=", 1.0),
]
COMPARE = {">=": operator.ge, "<=": operator.le}


def read_rows(path, kinds=("e2e", "selection")):
    """One dict per benchmark of a pytest-benchmark JSON file whose extra_info `kind` is one of
    `kinds`: its extra_info, the median and fastest times and the run's metadata."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    machine = data.get("machine_info", {}).get("tokenprune_bench", {})
    info = data.get("commit_info") or {}
    commit = (info.get("id") or "")[:10] + (" (uncommitted changes)" if info.get("dirty") else "")
    rows = []
    for bench in data["benchmarks"]:
        if bench["extra_info"].get("kind") not in kinds:
            continue  # e.g. bench_sweep.py's rows: pytest-benchmark's own table shows them
        row = dict(bench["extra_info"], name=bench["name"], median_s=bench["stats"]["median"],
                   min_s=bench["stats"]["min"], rounds=bench["stats"]["rounds"],
                   source=str(path), date=data.get("datetime", "?"),
                   versions=machine.get("versions", {}),
                   timer=bench.get("options", {}).get("timer"), commit=commit)
        if row["kind"] in ("e2e", "selection"):
            row["images_per_s"] = row["batch"] / row["median_s"]
        rows.append(row)
    return rows


def add_comparisons(rows):
    """speedup and mem_ratio of every row against its baseline row (end to end: the
    unpatched model; selection: the hook baseline), and for selection rows
    speedup_excl_qkv, the speedup once the time of in_proj(ln_1(X)) (the "qkv" row, which the
    pruned block needs for its attention anyway) is taken off."""
    def key(row):
        what = row.get("model") if row["kind"] == "e2e" else row.get("tokens")
        return row["source"], row["device"], row["kind"], what, row["batch"], row["dtype"]

    by_provider = {(key(row), row["provider"]): row for row in rows}
    for row in rows:
        base = by_provider.get((key(row), {"e2e": "unpatched", "selection": "hook"}[row["kind"]]))
        row["speedup"] = (base["median_s"] / row["median_s"]
                          if base and row["provider"] != "qkv" else None)
        qkv = by_provider.get((key(row), "qkv"))
        own = row["median_s"] - qkv["median_s"] if qkv else 0
        row["speedup_excl_qkv"] = (base["median_s"] / own if base and own > 0
                                   and row["provider"] in ("reference", "triton") else None)
        base_mem = base.get("peak_mem_bytes") if base else None
        row["mem_ratio"] = (row["peak_mem_bytes"] / base_mem
                            if base_mem and row.get("peak_mem_bytes") is not None else None)
    return rows


def evaluate_targets(rows):
    """One result per (target, matching row); a target no row matches is 'not measured'."""
    results = []
    for what, where, metric, op, bound in TARGETS:
        matching = [row for row in rows if all(row.get(k) == v for k, v in where.items())]
        for row in matching:
            value = row.get(metric)
            status = "not measured" if value is None else (
                "met" if COMPARE[op](value, bound) else "missed")
            results.append(dict(target=what, case=case_label(row), measured=value,
                                required=f"{op} {bound:g}", status=status))
        if not matching:
            results.append(dict(target=what, case="-", measured=None, required=f"{op} {bound:g}",
                                status="not measured"))
    return results


def case_label(row):
    if row["kind"] == "selection":
        return f"{row['provider']}, T={row['tokens']}, B={row['batch']}, {row['device']}"
    return f"{row['model']}, {layer_label(row)}, batch {row['batch']}, {row['device']}"


def layer_label(row):
    if row.get("layer") is None:
        return "-"
    if row.get("layer_choice") == "last":
        return f"last block ({row['layer']})"
    return f"layer {row['layer']}"


def sections(rows):
    """Rows grouped by (device, dtype), in the order the files were given."""
    grouped = {}
    for row in rows:
        grouped.setdefault((row["device"], row["dtype"]), []).append(row)
    return grouped


def run_line(row):
    """Where and with what a row was measured: file, date, commit, versions, threads, timer."""
    versions = ", ".join(f"{name} {version}"
                         for name, version in row["versions"].items() if version)
    date = row["date"]
    if date.endswith("+00:00"):
        date = date[:16].replace("T", " ") + " UTC"
    commit = f" at commit {row['commit']}" if row.get("commit") else ""
    return (f"`{row['source']}`, run {date}{commit}: {versions}; "
            f"torch threads: {row.get('torch_threads', '?')}; timer: {row.get('timer')}.")


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def fmt_x(value):
    return fmt(value, ".2f", "-") + ("x" if value is not None else "")


def fmt_rate(value):
    return fmt(value, ",.0f" if value >= 100 else ".2f")


def fmt_mib(value):
    return fmt(None if value is None else value / MIB, ",.1f")


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return out


def render(rows, targets, plot_name=None, notes=()):
    out = ["# tokenprune benchmark results", ""] + [line for note in notes for line in (note, "")]
    out += ["Generated by `python bench/report.py` from pytest-benchmark JSON "
            "(`pytest bench/ --benchmark-only --benchmark-json=FILE`). Models have random "
            "weights (`pretrained=None`): speed does not depend on the weights. Times are the "
            "median of the rounds; images/s = batch / median time; speedups compare rows of "
            "the same run, model (or token count), batch and dtype. Pruning: k=10 anchors, "
            "m patches by score, kept tokens = 1 + k + m.",
            "",
            "Peak memory is what torch allocated during one call above what was already "
            "allocated (weights and inputs excluded). CUDA: `max_memory_allocated` after "
            "`reset_peak_memory_stats`, minus `memory_allocated` at the start; the total "
            "column is `max_memory_allocated` itself. CPU: the running sum of the allocation "
            "and free events of torch's CPU allocator recorded by `torch.profiler` "
            "(`profile_memory=True`); it does not see memory that oneDNN/BLAS allocate "
            "outside torch's allocator.", "",
            "## Targets", ""]
    out += table(["target", "case", "measured", "required", "status"],
                 [[t["target"], t["case"], fmt(t["measured"], ".2f"), t["required"],
                   f"**{t['status']}**" if t["status"] == "missed" else t["status"]]
                  for t in targets])
    if plot_name:
        out += ["", f"![end-to-end speedup against kept tokens]({plot_name})"]

    for (device, dtype), group in sections(rows).items():
        runs = {row["source"]: run_line(row) for row in group}
        out += ["", f"## {device}: {dtype}", ""] + [f"- {line}" for line in runs.values()]
        e2e = sorted((r for r in group if r["kind"] == "e2e"),
                     key=lambda r: (r["model"], r["batch"], E2E_ORDER.get(r["provider"], 9),
                                    LAYER_ORDER.get(r.get("layer_choice"), 9), r.get("m") or 0))
        with_total = any(r.get("peak_mem_total_bytes") is not None for r in group)
        if e2e:
            header = ["model", "batch", "provider", "backend", "pruned at", "kept tokens",
                      "images/s", "vs unpatched", "peak MiB"] + (
                          ["peak total MiB"] if with_total else [])
            out += ["", "### End to end: `model.encode_image`", ""]
            out += table(header, [
                [r["model"], r["batch"], r["provider"], r.get("backend") or "-", layer_label(r),
                 r["kept_tokens"], fmt_rate(r["images_per_s"]), fmt_x(r["speedup"]),
                 fmt_mib(r.get("peak_mem_bytes"))]
                + ([fmt_mib(r.get("peak_mem_total_bytes"))] if with_total else []) for r in e2e])
        selection = sorted((r for r in group if r["kind"] == "selection"),
                           key=lambda r: (r["tokens"], r["batch"],
                                          SELECTION_ORDER.get(r["provider"], 9)))
        if selection:
            header = ["shape", "T", "C", "H", "batch", "provider", "median ms",
                      "vs hook baseline", "same, without qkv", "peak MiB"] + (
                          ["peak total MiB"] if with_total else [])
            out += ["", "### Selection alone: block input X to kept tokens (k=10, m=50)", "",
                    "Every provider starts from the block input X. hook: the seed's approach "
                    "(attention weights through hooks, `need_weights=True`, then the selection "
                    "in PyTorch); reference, triton: `in_proj(ln_1(X))` then tokenprune's "
                    "`select_and_gather`; qkv: `in_proj(ln_1(X))` alone, which the pruned "
                    "block needs for its attention anyway. \"same, without qkv\" is the "
                    "speedup over the hook baseline once the qkv time is taken off.", ""]
            out += table(header, [
                [r["shape"], r["tokens"], r["channels"], r["heads"], r["batch"], r["provider"],
                 fmt(r["median_s"] * 1e3, ",.2f"), fmt_x(r["speedup"]),
                 fmt_x(r["speedup_excl_qkv"]),
                 fmt_mib(r.get("peak_mem_bytes"))]
                + ([fmt_mib(r.get("peak_mem_total_bytes"))] if with_total else [])
                for r in selection])
    return "\n".join(out) + "\n"


def plot(rows, path):
    """Speedup over the unpatched model against kept tokens, one panel per run and model,
    one line per layer choice. Returns False (and writes nothing) without end-to-end rows or
    without matplotlib."""
    panels = {}
    for row in rows:
        if row["kind"] == "e2e" and row["provider"] != "unpatched" and row["speedup"]:
            panels.setdefault((row["source"], row["device"], row["model"], row["batch"]),
                              []).append(row)
    if not panels:
        return False
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(panels))
    nrows = -(-len(panels) // columns)
    fig, axes = plt.subplots(nrows, columns, figsize=(6.4 * columns, 4.6 * nrows), squeeze=False)
    for ax, ((source, device, model, batch), group) in zip(axes.flat, panels.items()):
        lines = {}
        for row in group:
            key = (row["provider"], row.get("layer_choice"), row["layer"])
            lines.setdefault(key, []).append(row)
        for (provider, choice, layer), line in sorted(lines.items(), key=lambda item: (
                E2E_ORDER.get(item[0][0], 9), LAYER_ORDER.get(item[0][1], 9))):
            line.sort(key=lambda r: r["kept_tokens"])
            label = f"pruned at the last block (layer {layer})" if choice == "last" \
                else f"pruned at layer {layer}"
            style = dict(marker="o", linewidth=2, markersize=7)
            if provider != "pruned":
                label += f", {provider.replace('pruned-', '')} backend"
                style = dict(marker="s", linestyle="--", fillstyle="none", linewidth=1,
                             markersize=8)
            ax.plot([r["kept_tokens"] for r in line], [r["speedup"] for r in line], label=label,
                    color="C0" if choice == "last" else "C1", **style)
        first = group[0]
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.plot([first["tokens"]], [1.0], marker="D", color="grey", linestyle="none",
                label=f"unpatched ({first['tokens']} tokens)")
        ax.set_title(textwrap.fill(f"{model}, batch {batch}, {first['dtype']}: {device}", 60),
                     fontsize=10)
        ax.set_xlabel("tokens kept after the pruned block (1 + k + m, k = 10)")
        ax.set_ylabel("images/s, relative to unpatched")
        ax.set_xlim(0, first["tokens"] * 1.05)
        ax.set_ylim(0, max(1.1, max(r["speedup"] for r in group) * 1.15))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fidelity_section(folder):
    """The accuracy-retention summary of `folder`/fidelity.md (written by bench/fidelity.py), for
    the end of the results page; "" when there is none."""
    path = Path(folder) / "fidelity.md"
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    start, end = text.find("## Summary"), text.find("## Every setting")
    if start < 0:
        return ""
    summary = text[start + len("## Summary"):end if end > 0 else None].strip()
    return ("\n\n## Accuracy retention (the shipped small ViTs, trained attention, two regimes)\n\n"
            "From `python bench/fidelity.py`; the measurement details and every setting are in "
            "[fidelity.md](fidelity.md).\n\n" + summary + "\n")


def vlm_section(folder):
    """The LLaVA results of `folder`/vlm.md (written by bench/vlm_report.py), for the end of the
    results page; "" when there is none."""
    path = Path(folder) / "vlm.md"
    if not path.exists():
        return ""
    body = path.read_text(encoding="utf-8").split("\n", 1)[-1].strip()
    body = body.replace("\n## ", "\n### ")  # its run sections sit under this page's section
    return ("\n\n## Vision-language models: LLaVA with fewer image tokens\n\n"
            "From [vlm.md](vlm.md) (`python bench/vlm_report.py`).\n\n" + body + "\n")


def targets_text(targets):
    return "\n".join(f"[{t['status']:>12}] {t['target']} | {t['case']}: "
                     f"{fmt(t['measured'], '.2f')} (required {t['required']})" for t in targets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (one per run)")
    parser.add_argument("--out", default=HERE / "RESULTS.md", type=Path)
    parser.add_argument("--plot", default=HERE / "speedup.png", type=Path)
    parser.add_argument("--note", action="append", default=[],
                        help="a paragraph for the top of the page (how the runs were made)")
    args = parser.parse_args(argv)

    rows = add_comparisons([row for path in args.json for row in read_rows(path)])
    targets = evaluate_targets(rows)
    plotted = plot(rows, args.plot)
    plot_name = None
    if plotted:
        try:
            plot_name = args.plot.resolve().relative_to(args.out.resolve().parent).as_posix()
        except ValueError:
            plot_name = args.plot.resolve().as_posix()
    page = render(rows, targets, plot_name, args.note).rstrip("\n") + "\n"
    args.out.write_text(page + fidelity_section(args.out.parent) + vlm_section(args.out.parent),
                        encoding="utf-8")
    print(targets_text(targets))
    print(f"wrote {args.out}" + (f" and {args.plot}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
