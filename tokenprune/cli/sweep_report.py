"""What `tokenprune sweep` writes about its grid (OUTPUT_FILES): summary.md (the table, the
findings where a simpler choice wins, which cut or schedule wins at each budget), the plot of
the primary metric against kept tokens, and the statistics they rest on (the noise margin, Wilson
intervals). Plain Python: matplotlib is imported only to draw. tokenprune/cli/sweep.py runs the
grid and writes the files."""
import math
import os

from ..config import CONTROLS
from .flags import schedule_text

# What `tokenprune sweep` writes into --output_dir.
OUTPUT_FILES = ("results.csv", "results.json", "accuracy_vs_tokens.png", "summary.md")


def _weights(meta):
    """The weights as CLIP_benchmark names them in its output file: a file's base name, or the tag."""
    return os.path.basename(meta["pretrained"]) if os.path.isfile(meta["pretrained"]) \
        else meta["pretrained"]


def _label(row):
    schedule = f"schedule {schedule_text(row['schedule'])}, " if row.get("schedule") else ""
    if row["kind"] == "mmr":
        return f"{schedule}mmr, k={row['k_anchors']}, m={row['top_m']}, lambda={row['mmr_lambda']}"
    if row["kind"] != "score":  # cls, random: only k + m counts
        return f"{schedule}{row['kind']}, k+m={row['k_anchors'] + row['top_m']}"
    return (f"{schedule}k={row['k_anchors']}, m={row['top_m']}, alpha={row['alpha']}, "
            f"{row['score_norm']}")


def _placed_label(row):
    """_label with where the row prunes: its schedule, or its block."""
    if row.get("schedule"):
        return _label(row)
    return f"block {_block_name(row['block'], row['num_blocks'])}, {_label(row)}"


def _budget_key(row):
    """Where a row's controls are: its (last) block, kept tokens and, for a schedule, every
    stage's (block, patches kept)."""
    shape = tuple((layer, k + m) for layer, k, m in row.get("schedule") or ())
    return row["block"], row["kept_tokens"], shape


def _block_name(block, blocks):
    """A block for people: counted from 1, its 0-based index beside it ("12 of 12 (index 11)")."""
    return f"{block + 1} of {blocks} (index {block})"


def _is_seed_score(row):
    """A pruned row of the seed's own selection (any alpha, score_norm)."""
    return row["kind"] == "score" and row["pruned"]


def _method(row):
    """What a row's selection is called in the sweep's findings: its kind (a control), or the
    grid's other selection with its parameter ("mmr with lambda 0.7")."""
    if row.get("mmr_lambda") is not None:
        return f"{row['kind']} with lambda {row['mmr_lambda']}"
    return row["kind"]


def noise(p, n):
    """The margin a difference must pass to count as more than sampling noise: two binomial
    standard errors of a value p measured on n images, 2 sqrt(p (1 - p) / n), and never less
    than one image (1 / n)."""
    return max(1 / n, 2 * math.sqrt(max(p * (1 - p), 0.0) / n))


# The plot's error bars: Wilson score intervals at 95 % (z = 1.96), which stay inside [0, 1]
# and keep their coverage near 0 and 1, where the normal approximation does not.
Z_95 = 1.96


def wilson_interval(p, n, z=Z_95):
    """(low, high) of the binomial proportion p observed on n images."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _budgets(result):
    """{(block, kept tokens): (the seed's score rows, the other rows)} of the pruned rows with a
    value of the primary metric."""
    primary = result["primary"]
    budgets = {}
    for row in result["rows"][1:]:
        if row["pruned"] and row[primary] is not None:
            score, others = budgets.setdefault(_budget_key(row), ([], []))
            (score if _is_seed_score(row) else others).append(row)
    return budgets


def simpler_choice_findings(result):
    """One line per budget (block, kept tokens) where a control, or another selection of the
    grid, keeps more of the primary metric than every setting of the seed's score, by more
    than the noise. Empty when there is none.

    The noise (`noise`): twice the binomial standard error of the best score setting's value p
    over the n images, 2 sqrt(p (1 - p) / n), and never less than one image (1 / n). The rows are
    measured on the same images, so their difference varies less than two independent
    estimates would (standard error at most sqrt(2) sqrt(p (1 - p) / n) when p is close for
    both): a difference above the margin is not sampling noise. The sweep runs the random
    control with one seed, so its spread over seeds is not known here (bench/fidelity.py
    measures it on the shipped models: about one to two points)."""
    primary, n = result["primary"], result["images"]
    lines = []
    for (block, kept, _), (score, others) in sorted(_budgets(result).items()):
        if not score or not others or not n:
            continue
        best = max(score, key=lambda r: r[primary])
        p = best[primary]
        margin = noise(p, n)
        winners = sorted((r for r in others if r[primary] - p > margin),
                         key=lambda r: -r[primary])
        if not winners:
            continue
        top, also = winners[0], winners[1:]
        line = (f"at block {_block_name(block, result['num_blocks'])}, {kept} tokens, {_method(top)} "
                f"keeps {100 * (top[primary] - p):.1f} points more {primary} than the best score "
                f"setting ({_label(best)}: {p:.4f} against {top[primary]:.4f}; n = {n}, "
                f"one image = {100 / n:.2g} points, noise {100 * margin:.1f} points)")
        if also:
            line += "; so do " + ", ".join(f"{_method(r)} (+{100 * (r[primary] - p):.1f})"
                                          for r in also)
        lines.append(line)
    return lines


def noise_range(result):
    """The noise of every budget where the seed's score meets a control or another selection,
    as the findings use it: "9.0 points" or "8.8 to 9.0 points"; None when there is none."""
    primary, n = result["primary"], result["images"]
    margins = sorted(100 * noise(max(r[primary] for r in score), n)
                     for score, others in _budgets(result).values() if score and others and n)
    if not margins:
        return None
    low, high = f"{margins[0]:.1f}", f"{margins[-1]:.1f}"
    return f"{low} points" if low == high else f"{low} to {high} points"


def summary_markdown(meta, result):
    rows, primary = result["rows"], result["primary"]
    unpruned = rows[0]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# tokenprune sweep: {meta['model']} ({_weights(meta)}) on {meta['dataset']}",
             "",
             f"{result['images']} images, {meta['date']}, device {meta['device']}, "
             f"amp {meta['amp']}, batch size {meta['batch_size']}. "
             f"Unpruned {primary}: **{fmt(unpruned[primary])}** ({result['tokens']} tokens). "
             f"Metric: {primary}; retained = pruned / unpruned; cost = estimated multiply-adds "
             "of the image tower's blocks relative to unpruned (see docs/commands.md).",
             "",
             f"| block | kept tokens | best setting | {primary} | retained | cls control | "
             f"random control | unpruned | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    # The grid's own settings (the seed's score, mmr), not the controls: per budget, the best
    # setting of each selection, the seed's score first.
    budgets = {}
    for row in rows[1:]:
        if row["kind"] not in CONTROLS and row["pruned"]:
            kinds = budgets.setdefault(_budget_key(row), {})
            kinds.setdefault(row["kind"], []).append(row)
    for (block, kept, shape), kinds in sorted(budgets.items()):
        controls = {r["kind"]: r[primary] for r in rows
                    if r["kind"] in CONTROLS and _budget_key(r) == (block, kept, shape)}
        control = lambda kind: fmt(controls[kind]) if kind in controls else "-"  # noqa: E731
        for kind in sorted(kinds, key=lambda kind: kind != "score"):
            best = max(kinds[kind],
                       key=lambda r: -math.inf if r[primary] is None else r[primary])
            lines.append(f"| {_block_name(block, result['num_blocks'])} | {kept} | "
                         f"{_label(best)} | {fmt(best[primary])} | "
                         f"{fmt(best[f'{primary}_retained'])} | {control('cls')} | "
                         f"{control('random')} | {fmt(unpruned[primary])} | "
                         f"{best['relative_cost']:.3f} |")
    skipped = [r for r in rows[1:] if not r["pruned"]]
    if skipped:
        lines += ["", f"Not pruned (k + m >= {result['tokens'] - 1} patches, the unpruned "
                      f"model's numbers): {'; '.join(_label(r) for r in skipped)}."]
    findings = simpler_choice_findings(result)
    margins = noise_range(result)
    here = f": here {margins} at n = {result['images']} images" if margins else ""
    lines += ["", "## Where a simpler choice wins", ""]
    lines += [f"- {line}." for line in findings] or [
        "At no budget does a control or another selection keep more than the best setting of "
        "the seed's score by more than the noise (two binomial standard errors of the best "
        f"score setting's value p, 2 sqrt(p (1 - p) / n), at least one image{here})."]
    winners = schedule_winners(result)
    if winners:
        lines += ["", "## Which cut or schedule wins at each budget", "",
                  "The budget is the mean tokens per block over the tower's "
                  f"{result['num_blocks']} blocks (a pruned block counted at the tokens it "
                  f"keeps); at each budget, the best {primary} among the settings and controls "
                  "that run on at most that many (docs/commands.md).", ""]
        lines += [f"- {line}." for line in winners]
    lines += ["", f"The plot's error bars are 95 % Wilson intervals for {primary} as a "
                  f"proportion of the {result['images']} images."]
    return "\n".join(lines) + "\n"


def schedule_winners(result):
    """One line per budget, the mean tokens per block of some pruned row (ascending): the row
    with the best primary metric among those that run on at most that many tokens per block
    (of equal metric, the cheaper), and the next best with its distance, said to be within the
    noise (`noise`) where it is. Rows without a mean_tokens (older results) are left out."""
    primary, n = result["primary"], result["images"]
    rows = [r for r in result["rows"][1:] if r["pruned"] and r[primary] is not None
            and r.get("mean_tokens") is not None]
    lines = []
    for budget in sorted({r["mean_tokens"] for r in rows}):
        best, *rest = sorted((r for r in rows if r["mean_tokens"] <= budget),
                             key=lambda r: (-r[primary], r["mean_tokens"]))
        line = (f"at most {budget:.1f} tokens per block: {_placed_label(best)} "
                f"({best[primary]:.4f} {primary}, {best['mean_tokens']:.1f} tokens per block)")
        if rest:
            gap = best[primary] - rest[0][primary]
            within = ", within the noise" if n and gap <= noise(best[primary], n) else ""
            line += (f"; next: {_placed_label(rest[0])} ({rest[0][primary]:.4f}, "
                     f"{100 * gap:.1f} points less{within})")
        lines.append(line)
    return lines


# The plot: a colour per pruned block; within a block, each series its own line style and
# marker; markers and lines thinner with each series drawn, so that series with equal values
# still show one around the other. The controls wear their block's colour.
LINE_STYLES = ("-", "--", "-.", ":")
SCORE_MARKERS = ("o", "^", "D", "v", "P", "<", ">", "h")
CONTROL_MARKERS = {"cls": "s", "random": "X"}
MARKER_SIZES = (13.0, 4.0)  # the first series drawn, the last
LINE_WIDTHS = (4.0, 1.0)


def _place(row):
    """Where a row prunes, for the plot: its schedule's blocks, or (its block,)."""
    return tuple(stage[0] for stage in row["schedule"]) if row.get("schedule") else (row["block"],)


def _place_name(place, depth):
    if len(place) == 1:
        return f"block {_block_name(place[0], depth)}"
    return f"blocks {', '.join(str(block + 1) for block in place)} of {depth} (a schedule)"


def plot_figure(meta, result):
    """The accuracy-against-kept-tokens figure (matplotlib, not yet saved)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    rows, primary, depth = result["rows"], result["primary"], result["num_blocks"]
    n = result.get("images")
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # A "block" here is where a row prunes: (its block,), or a schedule's stages' blocks.
    blocks = sorted({_place(r) for r in rows[1:] if r["kind"] in ("score", "mmr") + CONTROLS})
    series = {}  # (block, kind, alpha or mmr_lambda, score_norm) -> rows, in drawing order
    for block in blocks:
        for row in rows[1:]:
            if _place(row) == block and row["kind"] == "score":
                series.setdefault((block, "score", row["alpha"], row["score_norm"]),
                                  []).append(row)
            elif _place(row) == block and row["kind"] == "mmr":
                series.setdefault((block, "mmr", row["mmr_lambda"], None), []).append(row)
        for kind in CONTROLS:
            members = [r for r in rows if r["kind"] == kind and _place(r) == block]
            if members:
                series[(block, kind, None, None)] = members

    def shrinking(sizes, i):  # from sizes[0] for the first series to sizes[1] for the last
        return sizes[0] - (sizes[0] - sizes[1]) * i / max(1, len(series) - 1)

    budgets = [r["kept_tokens"] for r in rows[1:] if r["pruned"]] or [0]
    # One budget (the smallest sweep): matplotlib would span the single x by +-0.66 %, which
    # reads as 16.985 to 17.015; give it a tenth of the tokens either side instead.
    fewest, most = min(budgets), max(budgets)
    single = fewest == most
    pad = max(1.0, 0.1 * result["tokens"]) if single else 0.0
    # Bars a little to the side of each other: a fraction of the width the axes will show.
    dodge = 0.006 * ((most - fewest) or 2 * pad)
    in_block = {}
    for i_series, ((block, kind, alpha, norm), members) in enumerate(series.items()):
        colour = colours[blocks.index(block) % len(colours)]
        i = in_block[block] = in_block.get(block, -1) + 1
        members = sorted(members, key=lambda r: r["kept_tokens"])
        if kind in ("score", "mmr"):
            marker, linestyle = SCORE_MARKERS[i % len(SCORE_MARKERS)], \
                LINE_STYLES[i % len(LINE_STYLES)]
            setting = f"alpha {alpha}, {norm}" if kind == "score" else f"mmr, lambda {alpha}"
            label = f"{_place_name(block, depth)}, {setting}"
        else:
            marker, linestyle = CONTROL_MARKERS[kind], ":"
            seed = f" (seed {members[0]['seed']})" if kind == "random" else ""
            label = f"{kind} control{seed}, {_place_name(block, depth)}"
        x, y = [r["kept_tokens"] for r in members], [r[primary] for r in members]
        ax.plot(x, y, color=colour, marker=marker, linestyle=linestyle,
                linewidth=shrinking(LINE_WIDTHS, i_series),
                markersize=shrinking(MARKER_SIZES, i_series), markerfacecolor=colour,
                markeredgecolor="black", markeredgewidth=0.6, alpha=0.9, label=label)
        measured = [(at, value) for at, value in zip(x, y) if value is not None]
        if n and measured:
            # Each series' bars a little to the side of the last one's, so that bars at the
            # same budget stay apart; the points themselves stay at their budget.
            side = (i_series - (len(series) - 1) / 2) * dodge
            low, high = zip(*(wilson_interval(value, n) for _, value in measured))
            ax.errorbar([at + side for at, _ in measured], [value for _, value in measured],
                        yerr=[[value - lo for (_, value), lo in zip(measured, low)],
                              [hi - value for (_, value), hi in zip(measured, high)]],
                        fmt="none", ecolor=colour, elinewidth=1.0, capsize=0, alpha=0.5)
    if rows[0][primary] is not None:
        ax.axhline(rows[0][primary], color="black", linestyle="--",
                   label=f"unpruned ({result['tokens']} tokens)")
        if n:
            ax.axhspan(*wilson_interval(rows[0][primary], n), color="black", alpha=0.07,
                       linewidth=0)
    if single:
        ax.set_xlim(fewest - pad, most + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # token counts: whole numbers
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel(f"tokens kept after the pruned block (of {result['tokens']})")
    ax.set_ylabel(f"{primary} on {meta['dataset']}")
    bars = ("; bars and band: 95 % Wilson intervals" if n else "")
    title = ax.set_title(f"{primary} against kept tokens: {meta['model']} ({_weights(meta)}) "
                         f"on {meta['dataset']}, {result['images']} images{bars}", fontsize=10)
    ax.grid(alpha=0.3)
    # Beside the axes, so that it never covers a point.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _fit_title(fig, title)
    return fig


def _fit_title(fig, title):
    """Wrap the title (centred over the axes) onto as many lines as keep it inside the figure:
    a long one ran off its left edge."""
    import textwrap
    text = title.get_text()
    for lines in range(1, 6):  # lines of about equal length, as few as fit
        title.set_text(textwrap.fill(text, math.ceil(len(text) / lines) + 4))
        fig.tight_layout()
        box = title.get_window_extent(fig.canvas.get_renderer())
        if box.x1 <= fig.bbox.x1 and box.x0 >= fig.bbox.x0:
            return


def plot(meta, result, path):
    import matplotlib.pyplot as plt
    fig = plot_figure(meta, result)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
