"""Tables and figures of a recipe grid, from its result records (and, for the training-curve
figure only, each run's `log.jsonl` under the checkpoint root).

`write_reports(records, out_dir, grid, checkpoint_root=None)` dispatches on `grid['report']['kind']`:
- `distillation` (the paper's): per group of settings, an appendix-style table (rows "1 (Teacher)",
  2, ..., PLL; columns = corruption rates; mean +- std over seeds; the best per column, and every
  value within one std of it, in bold) as Markdown and LaTeX, the grid's records as CSV, the
  distillation-gain bar figure and the training-curve figure (test accuracy per epoch).
- `ls_temperature` (companion study): per group and corruption rate, the teacher and the student
  of every temperature under each label-smoothing alpha, top-1 / top-2, confidence and entropy.

Steps are named as in the paper everywhere (tables, figures, legends): "1 (Teacher)", 2, 3, ...,
PLL (`utils.steps.Step.label`). Std is the sample std over seeds (ddof=1); with one seed there is
none and a cell shows its mean alone. Every caption states n and the std convention. A cell
without any finished run shows "-".
"""
import csv
import io
import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils.cli import plural
from utils.io import atomic_save_figure, atomic_write_text
from utils.runs import SETTING_COLUMNS, config_from_settings, run_dir, step_fields, with_key_neutral_settings
from utils.selection import DEFAULT, RULE, RULES
from utils.steps import Step, step_of

MISSING = "-"
DEFAULT_GAIN_ETAS = (0.5, 0.6, 0.7, 0.8, 0.9)
# C2's non-inferiority margin (accuracy points) in claims.md: PLL may trail the best round by less
DEFAULT_CLAIMS_MARGIN = 1.0
# What each metric choice reads, and the words that say so in every caption: a selection rule's
# number, or `selected`, the number of the rule each run chose with.
METRIC_DESCRIPTION = {
    **{rule.name: rule.picks for rule in RULES},
    "selected": "test accuracy of the checkpoint that each run's own --selection chose (and handed on as "
                "teacher)",
}
# Settings that never split a table into groups: they are its rows, columns or repetitions.
NOT_GROUPING = ("seed", "eta")
# CSV columns shown first (the key, the settings declared with a column, with the step's label beside its
# code, the headline accuracies); the rest follow alphabetically.
_AFTER_STEP = SETTING_COLUMNS.index("step") + 1
CSV_FIRST = ("key", *SETTING_COLUMNS[:_AFTER_STEP], "step_label", *SETTING_COLUMNS[_AFTER_STEP:],
             *(rule.field() for rule in RULES))
# Measured float columns of records.csv and their decimals (the float32 numbers of a run carry noise
# such as 95.00000762939453): percentages to 4 decimals, entropies (nats) to 6. Every other column
# (settings such as lr 5e-5, integers, strings, wall time) is written as recorded.
CSV_DECIMALS = {"test_acc": 4, "test_top2": 4, "test_confidence": 4, "val_acc": 4, "best_train_acc": 4,
                "realised_corruption": 4, "teacher_top2_coverage": 4, "test_entropy": 6}
STD_WORDS = "sample std, ddof=1"


def record_value(record: dict, metric: str, quantity: str = "test_acc"):
    """`quantity` of a record under a metric choice; 'selected' follows the record's own selection
    (a teacher has none: it trains the same under every rule)."""
    chosen = record.get("selection", DEFAULT.name) if metric == "selected" else metric
    return _value(record, RULE[chosen].field(quantity))


def report_options(grid: dict) -> dict:
    report = dict(grid.get("report") or {})
    report.setdefault("kind", "distillation")
    report.setdefault("metric", DEFAULT.name)
    report.setdefault("claims_margin", DEFAULT_CLAIMS_MARGIN)
    report["title"] = report.get("title") or grid.get("title") or grid.get("name", "report")
    return report


def _value(record: dict, field: str):
    v = record.get(field)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(v)


def _stats(values: list):
    """(mean, std, n) of the non-missing values, std the sample std (ddof=1) and None when n = 1;
    None when there are no values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(vals) > 1 else None), len(vals)


def _pm(stat, pm: str = "±", digits: int = 2) -> str:
    """'mean ± std' of a (mean, std, n) triple; the mean alone when there is no std (n = 1)."""
    mean, std, _ = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} {pm} {std:.{digits}f}"


def format_eta(eta) -> str:
    text = f"{float(eta):g}"
    return text if ("." in text or "e" in text) else text + ".0"


def _fmt_setting(name: str, value) -> str:
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def steps_in(records: list, kinds=("teacher", "student", "pll")) -> list:
    """The steps (of the given kinds) that records hold, teacher first, rounds in order, PLL last."""
    steps = {step_of(r["step"]) for r in records}
    return sorted((s for s in steps if s.kind in kinds), key=Step.sort_key)


# ---- grouping ------------------------------------------------------------------------------
def _grouping_fields(records: list, exclude=()) -> list:
    """Settings (of any step) that take more than one value among the records."""
    names = [n for n in step_fields(Step.student(1)) if n not in NOT_GROUPING and n not in exclude]
    return [n for n in names if len({repr(r[n]) for r in records if n in r}) > 1]


def group_records(records: list, exclude=()) -> list:
    """[(group settings dict, records)] split on every varying setting except seed, eta (and
    `exclude`). A record that lacks a setting (teachers have no temperature) joins, as a copy
    holding the group's value of that setting, every group that agrees with it on the settings it
    has. Groups are ordered by first appearance."""
    fields = _grouping_fields(records, exclude)
    keys = []
    for r in records:
        if all(f in r for f in fields):
            key = tuple((f, r[f]) for f in fields)
            if key not in keys:
                keys.append(key)
    if not keys:  # e.g. only teachers: group on what they have
        for r in records:
            key = tuple((f, r[f]) for f in fields if f in r)
            if key not in keys:
                keys.append(key)
    out = []
    for key in keys:
        # A shared record gets the group's value of what it lacks: a teacher (no `selection`, it
        # trains the same under every rule) is then read under the rule of the group it serves.
        members = [r if all(f in r for f, _ in key) else {**dict(key), **r}
                   for r in records if all(r.get(f, v) == v for f, v in key)]
        out.append((dict(key), members))
    return out


def group_title(settings: dict, members: list) -> str:
    """Dataset first, then the settings that say what the table is (constant ones included)."""
    first = members[0]
    parts = [str(settings.get("dataset", first.get("dataset", "?")))]
    lead = ("backbone", "ctype", "lr", "wd")
    shown = list(lead) + [f for f in settings if f != "dataset" and f not in lead]
    for name in shown:
        value = settings.get(name, first.get(name))
        if value is not None:
            parts.append(_fmt_setting(name, value))
    return parts[0] + " (" + ", ".join(parts[1:]) + ")"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# ---- the distillation table ----------------------------------------------------------------
def _bold_steps(cells: dict, steps: list, eta: float) -> set:
    """Steps whose cell at `eta` is bold: the best displayed mean, and every displayed mean within
    one std of it, the std being the larger of the two cells' (none with one seed: then only ties)."""
    present = [(s, c) for s in steps if (c := cells[s, eta]) is not None]
    if not present:
        return set()
    _, best = max(present, key=lambda sc: round(sc[1][0], 2))
    bold = set()
    for s, c in present:
        spread = max(round(c[1] or 0.0, 2), round(best[1] or 0.0, 2))
        if round(best[0], 2) - round(c[0], 2) <= spread + 1e-9:
            bold.add(s)
    return bold


def distillation_table(members: list, metric: str, seeds: int = 0) -> dict:
    """Cells of one appendix table: {'etas', 'steps', 'cells': {(step, eta): (mean, std, n) | None},
    'best': {eta: best displayed mean}, 'bold': {eta: steps shown in bold}, 'n': the seeds a cell
    should have: `seeds` (the grid's), or the most in any cell if more}."""
    etas = sorted({float(r["eta"]) for r in members})
    steps = [s.code for s in steps_in(members)]
    values = defaultdict(list)
    for r in members:
        values[r["step"], float(r["eta"])].append(record_value(r, metric))
    cells = {(s, e): _stats(values.get((s, e), [])) for s in steps for e in etas}
    best = {}
    for e in etas:
        means = [round(c[0], 2) for s in steps if (c := cells[s, e]) is not None]
        best[e] = max(means) if means else None
    bold = {e: _bold_steps(cells, steps, e) for e in etas}
    n = max([seeds] + [c[2] for c in cells.values() if c is not None])
    return {"etas": etas, "steps": steps, "cells": cells, "best": best, "bold": bold, "n": n}


def _cell_text(cell, is_bold: bool, n_max: int, bold, pm: str) -> str:
    if cell is None:
        return MISSING
    text = _pm(cell, pm)
    if is_bold:
        text = bold(text)
    if cell[2] < n_max:
        text += f" (n={cell[2]})"
    return text


def _caption(title: str, metric: str, n: int, what: str) -> str:
    if n == 0:
        why = " (best-by-validation needs val_split > 0)" if metric == "val" else ""
        return f"{title}: {what}. No run has the {METRIC_DESCRIPTION[metric]}{why}; '-' = no value."
    if n == 1:
        cells = f"the {METRIC_DESCRIPTION[metric]} of n = 1 seed (one seed: no std)"
        bold = "the best per column in bold (ties all bold)"
    else:
        cells = f"mean ± std over n = {n} seeds ({STD_WORDS}) of the {METRIC_DESCRIPTION[metric]}"
        bold = ("in bold, the best mean per column and every mean within one std of it (the larger of the "
                "two cells' stds): values that one std does not tell apart")
    return (f"{title}: {what}. Steps: 1 = teacher, 2, 3, ... = distillation rounds, PLL = partial-label "
            f"student. Cells: {cells}; {bold}; '-' = no finished run, (n=k) = only k seeds finished (no std "
            "when k = 1).")


def markdown_table(caption: str, head: str, columns: int, rows: list) -> list:
    """Lines of a Markdown table: the caption in italics, the `head` line, the rule under it (`columns`
    wide), then one line per (label, cell texts) row."""
    return ([f"*{caption}*", "", head, "|" + " --- |" * columns]
            + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows])


def _distillation_rows(table: dict, bold, pm: str) -> list:
    """(step label, cell texts) per step of a distillation table; `bold` marks a text, `pm` joins
    mean and std."""
    return [(step_of(s).label, [_cell_text(table["cells"][s, e], s in table["bold"][e], table["n"], bold, pm)
                                for e in table["etas"]])
            for s in table["steps"]]


def _table_markdown(table: dict, caption: str) -> str:
    head = "| step | " + " | ".join(f"eta = {format_eta(e)}" for e in table["etas"]) + " |"
    rows = _distillation_rows(table, lambda t: f"**{t}**", "±")
    return "\n".join(markdown_table(caption, head, len(table["etas"]) + 1, rows)) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def latex_table(caption: str, columns: str, head: str, rows: list, label=None) -> list:
    """Lines of a booktabs table: caption (escaped), optional label, tabular of `columns`, the `head`
    line, then one line per (label, cell texts) row (the label escaped, the cells already LaTeX)."""
    return ([r"\begin{table}[ht]", r"\centering", r"\small", r"\caption{" + _latex_escape(caption) + "}"]
            + ([r"\label{tab:" + label + "}"] if label is not None else [])
            + [r"\begin{tabular}{" + columns + "}", r"\toprule", head + r" \\", r"\midrule"]
            + [_latex_escape(name) + " & " + " & ".join(cells) + r" \\" for name, cells in rows]
            + [r"\bottomrule", r"\end{tabular}", r"\end{table}"])


def _table_latex(table: dict, caption: str, label: str) -> str:
    head = "Step & " + " & ".join(rf"$\eta={format_eta(e)}$" for e in table["etas"])
    rows = _distillation_rows(table, lambda t: r"\textbf{" + t + "}", r"$\pm$")
    return "\n".join(latex_table(caption, "l" + "c" * len(table["etas"]), head, rows, label)) + "\n"


# ---- records.csv -----------------------------------------------------------------------------
def records_csv(records: list) -> str:
    """The records as CSV rows, each with its step's name as the tables print it (`step_label`: the
    stored code `step` is '0', '1', 'p'; its label '1 (Teacher)', '2', 'PLL')."""
    records = [{**r, "step_label": step_of(r["step"]).label} for r in records]
    names = set().union(*(r.keys() for r in records)) if records else set()
    columns = [c for c in CSV_FIRST if c in names] + sorted(names - set(CSV_FIRST))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    order = sorted(records, key=lambda r: (str(r.get("dataset")), str(r.get("ctype")), float(r.get("eta", 0)),
                                           int(r.get("seed", 0)), step_of(r["step"]).sort_key(), r["key"]))
    for r in order:
        writer.writerow([_csv_value(c, r.get(c)) for c in columns])
    return buf.getvalue()


def _csv_decimals(column: str):
    for prefix, digits in CSV_DECIMALS.items():
        if column == prefix or column.startswith(prefix + "_"):
            return digits
    return None


def _csv_value(column: str, value):
    """A record's value as written to records.csv: measured floats rounded (CSV_DECIMALS), the rest as is."""
    if value is None:
        return ""
    digits = _csv_decimals(column)
    if digits is not None and isinstance(value, float) and math.isfinite(value):
        return repr(round(value, digits))
    return value


# ---- the gain figure -------------------------------------------------------------------------
def distillation_gains(members: list, metric: str, etas) -> dict:
    """{(step, eta): (mean, std, n)} of student metric minus the same seed's teacher metric, for
    every student step and each eta in `etas`; pairs without a teacher are left out."""
    teacher = {(float(r["eta"]), r["seed"]): record_value(r, metric)
               for r in members if step_of(r["step"]).is_teacher}
    gains = defaultdict(list)
    for r in members:
        if step_of(r["step"]).is_teacher or float(r["eta"]) not in etas:
            continue
        base, own = teacher.get((float(r["eta"]), r["seed"])), record_value(r, metric)
        if base is not None and own is not None:
            gains[r["step"], float(r["eta"])].append(own - base)
    return {k: _stats(v) for k, v in gains.items()}


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _seed_count(groups: list) -> int:
    return len({r["seed"] for _, members in groups for r in members})


def _captioned_panels(plt, nrows: int, ncols: int, caption_lines: list, *, fig_width: float, panel_in: float,
                      gap_in: float, wspace: float, sharey, below_in: float = 0.6):
    """(figure, 2-D axes) of nrows x ncols panels in fixed room (inches): the caption lines, wrapped to
    the width, above as the figure's title; panels of `panel_in` plus `gap_in` for their titles and
    axis labels; `below_in` under the last row for its tick and axis labels; room for a legend below."""
    text = "\n".join(textwrap.fill(line, int(fig_width * 13)) for line in caption_lines)
    caption_in, legend_in = 0.17 * (text.count("\n") + 1) + 0.2, 0.4
    height = caption_in + legend_in + nrows * (panel_in + gap_in) + below_in - 0.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_width, height), squeeze=False, sharey=sharey)
    fig.subplots_adjust(left=0.75 / fig_width, right=1 - 0.15 / fig_width, wspace=wspace,
                        top=1 - (caption_in + 0.3) / height, bottom=(legend_in + below_in) / height,
                        hspace=gap_in / panel_in)
    fig.suptitle(text, fontsize=9, y=1 - 0.1 / height, va="top")
    return fig, axes


def save_figure(plt, fig, stem: Path) -> list:
    written = atomic_save_figure(fig, stem, bbox_inches="tight")
    plt.close(fig)
    return written


def _gain_caption(groups: list, metric: str) -> tuple:
    """(the figure's one-line subtitle, its full caption for captions.md)."""
    seeds = _seed_count(groups)
    short = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    number = f"{RULE[metric].column} accuracy" if metric in RULE else "each run's own --selection"
    spread = f"mean and std ({STD_WORDS}) over {seeds} seeds" if seeds > 1 else "1 seed (no std)"
    shared = "; one y-axis for all panels" if len(groups) > 1 else ""
    return (f"Gain over the same seed's teacher (step 1): {short}, {number}",
            "Distillation gain (points) = a student step's test accuracy minus the same seed's teacher's "
            f"(step 1); {spread}{shared}. Below each corruption rate: the teacher's own accuracy (mean over "
            f"seeds). Number: {METRIC_DESCRIPTION[metric]}.")


def _gain_bars(ax, members: list, metric: str, gain_etas, steps: list, colours) -> list:
    """One group's panel: at each gain eta it ran, a bar per student step (the mean gain, its std as
    the error bar). Returns the etas drawn."""
    present = sorted({float(r["eta"]) for r in members})
    etas = [e for e in present if any(math.isclose(e, g) for g in gain_etas)]
    gains = distillation_gains(members, metric, etas)
    bar = 0.8 / max(len(steps), 1)
    for i, step in enumerate(steps):
        xs = [j + (i - (len(steps) - 1) / 2) * bar for j in range(len(etas))]
        stats = [gains.get((step.code, e)) for e in etas]
        means = [s[0] if s else np.nan for s in stats]
        ax.bar(xs, means, bar, yerr=[(s[1] or 0.0) if s else 0.0 for s in stats], capsize=2, color=colours[i],
               label=step.label)
    ax.axhline(0, color="black", linewidth=0.6)
    teacher = {e: _stats([record_value(r, metric) for r in members
                          if step_of(r["step"]).is_teacher and math.isclose(float(r["eta"]), e)])
               for e in etas}
    ax.set_xticks(range(len(etas)), [format_eta(e) + (f"\nteacher {teacher[e][0]:.1f}%" if teacher[e] else "")
                                     for e in etas])
    ax.set_xlabel("corruption rate eta")
    return etas


def gain_figure(groups: list, metric: str, title: str, gain_etas, out_dir: Path) -> list:
    plt = pyplot()
    count = max(len(groups), 1)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    # One y-axis for every panel: separate scales would make unlike panels look alike.
    fig, axes = _captioned_panels(plt, nrows, ncols, [title, _gain_caption(groups, metric)[0]],
                                  fig_width=max(4.6 * ncols, 7.0), panel_in=2.6, gap_in=1.1, wspace=0.12,
                                  sharey=True, below_in=0.85)  # tick labels of two lines: eta, teacher
    steps = steps_in([r for _, m in groups for r in m], kinds=("student", "pll"))
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(steps), 1)))
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for index, (ax, (settings, members)) in enumerate(zip(axes.flat, groups)):
        etas = _gain_bars(ax, members, metric, gain_etas, steps, colours)
        if index % ncols == 0:
            ax.set_ylabel("gain over teacher (pp)")
        ax.set_title(group_title(settings, members), fontsize=8)
        if not etas:
            ax.text(0.5, 0.5, "no runs at the gain etas", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:  # below the panels, never on the bars
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9,
                   title="step (1 = teacher)", title_fontsize=9)
    return save_figure(plt, fig, out_dir / "gain")


# ---- the training-curve figure ---------------------------------------------------------------
CURVE_FILES = ("curves.png", "curves.pdf")
CURVE_COLOURS = {"teacher": "black", "student": "tab:blue", "pll": "tab:orange"}  # by step kind


def curve_etas(present, gain_etas) -> list:
    """The two corruption rates of the curve figure: the lowest and the highest of the gain etas
    present in the grid (of all present etas when none of the gain etas is), one if only one."""
    chosen = sorted(e for e in present if any(math.isclose(e, g) for g in gain_etas)) or sorted(present)
    return chosen[:1] + chosen[-1:] if len(chosen) > 1 else chosen


def curve_steps(members: list) -> list:
    """Teacher, last distillation round and PLL (Steps), those present."""
    present = steps_in(members)
    rounds = [s for s in present if s.kind == "student"]
    return [s for s in [Step.teacher()] + rounds[-1:] + [Step.pll()] if s in present]


def log_path(checkpoint_root, record: dict) -> Path:
    """Where a run's per-epoch log lives: its checkpoint folder, derived from its record."""
    folder = run_dir(checkpoint_root, config_from_settings(record), record["step"], record["features_id"])
    return folder / "log.jsonl"


def read_test_curve(path: Path):
    """Test accuracy per epoch from a log.jsonl, or None when the file is missing or unreadable."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        curve = np.asarray([float(row["test_acc"]) for row in rows], dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return curve if curve.size else None


def training_curves(groups: list, gain_etas, checkpoint_root):
    """({(group index, eta, Step): [per-seed curves]}, etas, missing log paths) of the curve figure."""
    present = sorted({float(r["eta"]) for _, m in groups for r in m})
    etas = curve_etas(present, gain_etas)
    curves, missing = {}, []
    for index, (_, members) in enumerate(groups):
        for eta in etas:
            for step in curve_steps(members):
                runs = [r for r in members
                        if step_of(r["step"]) == step and math.isclose(float(r["eta"]), eta)]
                for r in sorted(runs, key=lambda r: r["seed"]):
                    path = log_path(checkpoint_root, r) if "features_id" in r else None
                    curve = read_test_curve(path) if path is not None else None
                    if curve is None:
                        missing.append(path or r.get("key"))
                    else:
                        curves.setdefault((index, eta, step), []).append(curve)
    return curves, etas, missing


def _mean_curve(curves: list):
    width = max(len(c) for c in curves)
    stack = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        stack[i, :len(c)] = c
    return np.nanmean(stack, axis=0)


def _skip_curves(out_dir: Path, checkpoint_root, missing: list) -> None:
    """Say in one line why there is no curve figure, and remove the one an earlier report left."""
    why = ("no checkpoint root given" if checkpoint_root is None else
           f"{plural(len(missing), 'run')} {'has' if len(missing) == 1 else 'have'} no readable log.jsonl "
           f"under {checkpoint_root}, e.g. {missing[0]}"
           if missing else "no runs")
    stale = [out_dir / name for name in CURVE_FILES if (out_dir / name).exists()]
    for path in stale:
        path.unlink()
    print(f"training curves skipped ({why})"
          + (f"; removed the stale {', '.join(p.name for p in stale)}" if stale else ""))


def _curves_caption(groups: list) -> tuple:
    """(the figure's one-line subtitle, its full caption for captions.md)."""
    seeds = plural(_seed_count(groups), "seed")
    return (f"Test accuracy per epoch, mean over {seeds}; dashed: the steps' mean best-by-test accuracy",
            f"Test accuracy per epoch, mean over {seeds}. Solid: the curve, whose end is the last-epoch "
            "number; dashed: the mean of each run's best-by-test accuracy (the paper's number). Their "
            "distance is what choosing the epoch on the test set adds. The y-range leaves out the first 5% "
            "of epochs.")


def _plot_step_curves(ax, runs: list, colour) -> list:
    """One step's mean curve over seeds (solid) and its mean best-by-test accuracy (dashed). Returns the
    values the panel's y-range must hold: the dashed level and the curve but its first 5% of epochs
    (the start-up transient)."""
    mean = _mean_curve(runs)
    best = float(np.mean([c.max() for c in runs]))
    ax.plot(np.arange(1, len(mean) + 1), mean, color=colour, linewidth=1.1)
    ax.axhline(best, color=colour, linestyle="--", linewidth=0.9)
    return [best, *mean[max(1, len(mean) // 20):]]


def _draw_curve_panels(axes, groups: list, etas: list, curves: dict) -> tuple:
    """Every panel (a row per group, a column per eta). Returns ({step label: colour} in the order
    first drawn, {column: the values its y-range must hold})."""
    labels, shown = {}, defaultdict(list)
    for row, (settings, members) in enumerate(groups):
        for col, eta in enumerate(etas):
            ax = axes[row, col]
            for step in curve_steps(members):
                runs = curves.get((row, eta, step))
                if runs:
                    colour = CURVE_COLOURS[step.kind]
                    shown[col] += _plot_step_curves(ax, runs, colour)
                    labels.setdefault(step.label, colour)
            ax.set_title(f"{group_title(settings, members)}, eta = {format_eta(eta)}", fontsize=8)
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
    return labels, shown


def _fit_column_ylims(axes, shown: dict) -> None:
    """Each column's shared y-range: the values it must hold plus a margin."""
    for col, values in shown.items():
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        margin = max(0.08 * (high - low), 0.5)
        axes[0, col].set_ylim(low - margin, high + margin)


def _curves_legend(fig, labels: dict) -> None:
    """Below the panels: the steps' colours (teacher, last round, PLL), then the two line styles."""
    from matplotlib.lines import Line2D

    order = list(labels)
    handles = [Line2D([], [], color=labels[lab]) for lab in order]
    handles += [Line2D([], [], color="grey"), Line2D([], [], color="grey", linestyle="--")]
    fig.legend(handles, order + ["per epoch (mean)", "best-by-test (mean)"], loc="lower center",
               ncol=len(handles), frameon=False, fontsize=9, title="step (1 = teacher)", title_fontsize=9)


def curves_figure(groups: list, title: str, gain_etas, out_dir: Path, checkpoint_root) -> list:
    """curves.png / .pdf: test accuracy per epoch (mean over seeds) of the teacher, the last round
    and PLL at two corruption rates, one row of panels per group, with each step's mean best-by-test
    accuracy as a dashed line, so the gap between the best-by-test and the last-epoch number shows.
    Without the logs (no checkpoint root, a store copied without its checkpoints) the figure is
    skipped with one printed line, and a curve figure left by an earlier report is removed."""
    curves, etas, missing = {}, [], []
    if checkpoint_root:
        curves, etas, missing = training_curves(groups, gain_etas, checkpoint_root)
    if checkpoint_root is None or missing or not curves:
        _skip_curves(out_dir, checkpoint_root, missing)
        return []
    plt = pyplot()
    # Panels of one corruption rate share their y-axis (rows are comparable); rates differ too much.
    fig, axes = _captioned_panels(plt, len(groups), len(etas), [title, _curves_caption(groups)[0]],
                                  fig_width=max(4.8 * len(etas), 7.0), panel_in=2.3, gap_in=0.8, wspace=0.2,
                                  sharey="col")
    labels, shown = _draw_curve_panels(axes, groups, etas, curves)
    _fit_column_ylims(axes, shown)
    _curves_legend(fig, labels)
    return save_figure(plt, fig, out_dir / "curves")


# ---- kinds -----------------------------------------------------------------------------------
def _tex_header(title: str) -> str:
    return f"% {title}: tables written by utils/report.py; needs \\usepackage{{booktabs}}"


def _write_tables(out_dir: Path, md: list, tex: list, records: list) -> list:
    """tables.md, tables.tex (their lines joined) and records.csv; returns their paths."""
    return [atomic_write_text(out_dir / "tables.md", "\n".join(md)),
            atomic_write_text(out_dir / "tables.tex", "\n".join(tex)),
            atomic_write_text(out_dir / "records.csv", records_csv(records))]


def distillation_report(records: list, out_dir: Path, grid: dict, checkpoint_root=None) -> list:
    opts = report_options(grid)
    metric, title = opts["metric"], opts["title"]
    groups = group_records(records)
    md = [f"# {title}", "", f"Number shown: {METRIC_DESCRIPTION[metric]}.", ""]
    tex = [_tex_header(title), ""]
    for index, (settings, members) in enumerate(groups):
        table = distillation_table(members, metric, grid.get("seeds", 0))
        name = group_title(settings, members)
        caption = _caption(title, metric, table["n"], name)
        md += [f"## {name}", "", _table_markdown(table, caption)]
        label = _slug(f"{grid.get('name', 'grid')}-{index}-{members[0].get('dataset', '')}")
        tex.append(_table_latex(table, caption, label))
    written = _write_tables(out_dir, md, tex, records)
    gain_etas = [float(e) for e in opts.get("gain_etas") or DEFAULT_GAIN_ETAS]
    gain = gain_figure(groups, metric, title, gain_etas, out_dir)
    curves = curves_figure(groups, title, gain_etas, out_dir, checkpoint_root)
    # the figures carry one-line subtitles; their full captions are here
    captions = [f"# {title}: figure captions", "",
                f"`gain.png`, `gain.pdf`: {_gain_caption(groups, metric)[1]}"]
    if curves:
        captions += ["", f"`curves.png`, `curves.pdf`: {_curves_caption(groups)[1]}"]
    return written + gain + curves + [atomic_write_text(out_dir / "captions.md", "\n".join(captions) + "\n")]


def ls_temperature_table(members: list, metric: str, eta: float) -> dict:
    """One companion-study table at one eta: {'alphas', 'rows': [(label, {alpha: cell})]} where a
    cell holds (mean, std, n) of top-1, top-2, confidence and entropy, or None."""
    at_eta = [r for r in members if math.isclose(float(r["eta"]), eta)]
    alphas = sorted({float(r["label_smoothing"]) for r in at_eta})
    quantities = ("test_acc", "test_top2", "test_confidence", "test_entropy")

    def cell(rs):
        if not rs:
            return None
        return {q: _stats([record_value(r, metric, q) for r in rs]) for q in quantities}

    def by_alpha(rs) -> dict:
        return {a: cell([r for r in rs if float(r["label_smoothing"]) == a]) for a in alphas}

    rows = [("Teacher", by_alpha([r for r in at_eta if step_of(r["step"]).is_teacher]))]
    students = steps_in(at_eta, kinds=("student",))
    temps = sorted({float(r["temperature"]) for r in at_eta
                    if "temperature" in r and not step_of(r["step"]).is_teacher})
    for step in students:
        of_step = [r for r in at_eta if step_of(r["step"]) == step]
        for t in temps:
            label = f"Student T = {t:g}" + (f" (round {step.round})" if len(students) > 1 else "")
            rows.append((label, by_alpha([r for r in of_step if float(r.get("temperature", -1)) == t])))
    pll = [r for r in at_eta if step_of(r["step"]).is_pll]
    if pll:
        rows.append(("PLL", by_alpha(pll)))
    return {"alphas": alphas, "rows": rows}


def _pair(cell, a: str, b: str, digits=2, n_max: int = 0) -> str:
    """'a ± std / b ± std' of one cell (no std with one seed), '(n=k)' when it has fewer seeds than
    the others."""
    if cell is None or cell[a] is None:
        return MISSING
    second = MISSING if cell[b] is None else _pm(cell[b], digits=digits)
    n = cell[a][2]
    return f"{_pm(cell[a])} / {second}" + (f" (n={n})" if n < n_max else "")


def _ls_seed_count(table: dict) -> int:
    """The most seeds behind any top-1 value of a companion-study table."""
    return max((c["test_acc"][2] for _, cells in table["rows"] for c in cells.values()
                if c is not None and c["test_acc"] is not None), default=0)


def _ls_rows(table: dict, n_max: int) -> list:
    """(label, cell texts) per row: for each alpha, top-1 / top-2, then confidence / entropy. The
    same texts go to Markdown and LaTeX."""
    rows = []
    for label, cells in table["rows"]:
        parts = []
        for a in table["alphas"]:
            parts += [_pair(cells[a], "test_acc", "test_top2", n_max=n_max),
                      _pair(cells[a], "test_confidence", "test_entropy", 3, n_max=n_max)]
        rows.append((label, parts))
    return rows


def _ls_caption(title: str, what: str, n: int, metric: str) -> str:
    spread = f"mean ± std ({STD_WORDS}) over n = {n} seeds" if n > 1 else "n = 1 seed (one seed: no std)"
    return (f"{title}: {what}. Top-1 / top-2 (%) and mean confidence (%) / entropy (nats), {spread}, of the "
            f"{METRIC_DESCRIPTION[metric]}; '-' = no finished run, (n=k) = only k seeds finished.")


def ls_temperature_report(records: list, out_dir: Path, grid: dict) -> list:
    opts = report_options(grid)
    metric, title = opts["metric"], opts["title"]
    md = [f"# {title}", "", f"Number shown: {METRIC_DESCRIPTION[metric]}, mean ± std ({STD_WORDS}) over "
          "seeds; the teacher's columns are its label-smoothing alpha, each student learns from the teacher "
          "of its column.", ""]
    tex = [_tex_header(title), ""]
    for settings, members in group_records(records, exclude=("label_smoothing", "temperature")):
        for eta in sorted({float(r["eta"]) for r in members}):
            what = f"{group_title(settings, members)}, eta = {format_eta(eta)}"
            table = ls_temperature_table(members, metric, eta)
            n = max(_ls_seed_count(table), grid.get("seeds", 0))
            caption, rows, alphas = _ls_caption(title, what, n, metric), _ls_rows(table, n), table["alphas"]
            head = "| | " + " | ".join(f"alpha = {a:g}: top-1 / top-2 | alpha = {a:g}: conf. / entropy"
                                       for a in alphas) + " |"
            md += [f"## {what}", ""] + markdown_table(caption, head, 2 * len(alphas) + 1, rows) + [""]
            head = " & " + " & ".join(rf"$\alpha={a:g}$: top-1 / top-2 & $\alpha={a:g}$: conf. / entropy"
                                      for a in alphas)
            tex += latex_table(caption, "l" + "cc" * len(alphas), head, rows) + [""]
    return _write_tables(out_dir, md, tex, records)


REPORTS = {"distillation": distillation_report, "ls_temperature": ls_temperature_report}


def write_reports(records: list, out_dir, grid: dict, checkpoint_root=None) -> list:
    """Write the report files of `grid['report']['kind']` under out_dir; return their paths.
    `checkpoint_root` is where the runs' log.jsonl files are (the training-curve figure reads them;
    without it, or without the logs, that figure is skipped with one printed line)."""
    kind = report_options(grid)["kind"]
    assert kind in REPORTS, f"report kind {kind!r} has no writer (load_grid validates kinds)"
    records = [with_key_neutral_settings(r) for r in records]  # a record without feature_norm: 'none'
    if kind == "distillation":
        return distillation_report(records, Path(out_dir), grid, checkpoint_root)
    return REPORTS[kind](records, Path(out_dir), grid)
