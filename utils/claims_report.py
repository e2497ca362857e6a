"""claims.md, claims.json and claims.png of a grid report (utils/claims.py computes the entries).

claims.json: a list of entries, each with the cell's settings (dataset, backbone, ctype, lr, wd, the
grid's varying settings, eta; eta null for C3, which spans the etas), `claim` (C1..C4),
`comparison`, `rule` (test / val / last), `n` (paired seeds), `mean`, `ci` ([low, high], 95%),
`verdict` (holds / contradicted / not resolved) and `rule_dependent`; C1/C2/C4 entries also name
the best round (`best_step`, the paper's step number) and what chose it (`best_chosen_on`), C2 its
`margin` and `beats`.
"""
import json
import math
from pathlib import Path

import numpy as np

from utils.claims import (CLAIM_FIELDS, CONFIDENCE, CONTRADICTED, HOLDS, MIN_SEEDS, RESULT_FIELDS, UNRESOLVED,
                          grid_claims, most_seeds_per_cell)
from utils.io import atomic_write_text
from utils.report import format_eta, markdown_table, pyplot, save_figure

CLAIM_FILES = ("claims.md", "claims.json", "claims.png", "claims.pdf")
CLAIM_TEXT = {
    "C1": "distillation helps under noise: student round minus teacher > 0",
    "C2": "PLL matches multi-round distillation: PLL minus the best round non-inferior at the margin "
          "(beats it when the interval is above 0)",
    "C3": "PLL's advantage grows with noise: slope over eta of PLL minus teacher > 0 (points per unit eta)",
    "C4": "more rounds eventually hurt: last round minus best round < 0",
}
RULE_TEXT = {"test": "best-by-test epoch (the paper's)", "val": "best-by-validation epoch",
             "last": "last epoch"}
RULE_COLOURS = {"test": "tab:blue", "val": "tab:green", "last": "tab:orange"}


_NOT_SETTINGS = ("dataset", "eta", *CLAIM_FIELDS, *RESULT_FIELDS)


def _setting_text(name: str, value) -> str:
    if name in ("dataset", "backbone", "ctype"):
        return str(value)
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def group_name(entry: dict, names=None) -> str:
    """'digits (pixels, cc, lr 0.05, wd 0.005)': an entry's settings but eta (only `names` if given)."""
    shown = [k for k, v in entry.items() if k not in _NOT_SETTINGS and v is not None
             and (names is None or k in names)]
    parts = [_setting_text(k, entry[k]) for k in shown]
    if names is not None:
        return ", ".join(([entry["dataset"]] if "dataset" in names else []) + parts)
    return f"{entry['dataset']} ({', '.join(parts)})"


def eta_name(entry: dict) -> str:
    return "all etas" if entry["eta"] is None else f"eta {format_eta(entry['eta'])}"


def cell_name(entry: dict) -> str:
    """'digits (pixels, cc, lr 0.05, wd 0.005), eta 0.5'."""
    return f"{group_name(entry)}, {eta_name(entry)}"


def _verdict_text(entry: dict) -> str:
    text = entry["verdict"]
    if entry.get("beats"):
        text += " (beats)"
    if entry.get("last_is_best"):
        text += " (the last round is the best)"
    if entry.get("best_chosen_on") == "test":
        text += " *"
    return text


def _interval_text(entry: dict) -> str:
    low, high = entry["ci"]
    return f"[{low:+.2f}, {high:+.2f}]"


def _comparison_text(entry: dict) -> str:
    best = f" (best = step {entry['best_step']})" if "best_step" in entry else ""
    return entry["comparison"] + best


def _points(value: float) -> str:
    return f"{value:g} accuracy point{'' if value == 1 else 's'}"


def _summary_rows(entries: list, rules: list) -> list:
    rows = []
    for claim in CLAIM_TEXT:
        for rule in rules:
            mine = [e for e in entries if e["claim"] == claim and e["rule"] == rule]
            if mine:
                counts = [sum(e["verdict"] == v for e in mine) for v in (HOLDS, CONTRADICTED, UNRESOLVED)]
                rows.append((claim, [rule, *map(str, counts)]))
    return rows


def is_headline(entry: dict) -> bool:
    """C1 of the best round, C2, C3 and C4; not C1 of each single round."""
    return not entry["comparison"].startswith("step ")


def _dependent_lines(entries: list) -> list:
    """One line per headline (cell, claim, comparison) whose verdict differs between rules, then how
    many single-round C1 comparisons differ too."""
    seen, lines = {}, []
    for e in entries:
        if e["rule_dependent"]:
            seen.setdefault((cell_name(e), e["claim"], e["comparison"]), []).append(e)
    for (cell, claim, comparison), group in seen.items():
        if is_headline(group[0]):
            verdicts = ", ".join(f"{e['rule']}: {_verdict_text(e)}" for e in group)
            lines.append(f"- **{claim}**, {cell}, {comparison}: {verdicts}")
    rounds = sum(not is_headline(group[0]) for group in seen.values())
    if rounds:
        lines.append(f"- and {rounds} single-round C1 comparison{'s' if rounds != 1 else ''} "
                     "(step t - teacher), marked in the tables below")
    return lines or ["- none: every verdict is the same under every selection rule present."]


def claims_markdown(entries: list, title: str, margin: float) -> str:
    rules = [r for r in RULE_TEXT if any(e["rule"] == r for e in entries)]
    md = [f"# Claims: {title}", "",
          "Each entry is a paired difference over seeds (one seed = the same corrupted labels and the same "
          f"chain): its mean and {int(CONFIDENCE * 100)}% Student-t interval (scipy.stats, n - 1 degrees of "
          f"freedom), in accuracy points; entries need >= {MIN_SEEDS} paired seeds. Verdict: holds when the "
          "interval lies on the claim's side of its threshold, contradicted when on the other side, "
          "not resolved when it covers the threshold (more seeds could tell).",
          "", *[f"- **{c}** {text}" + (f" (margin: {_points(margin)})" if c == "C2" else "")
                for c, text in CLAIM_TEXT.items()],
          "", "Rules (which epoch's test accuracy each run reports): "
          + "; ".join(f"{r} = {RULE_TEXT[r]}" for r in rules) + ". The best round is the round of highest "
          "mean validation accuracy; `*` marks a best round chosen on the test numbers themselves (no "
          "validation split): an optimistic choice.", "",
          "## Verdicts that depend on the selection rule", "", *_dependent_lines(entries), "",
          *markdown_table("Count of verdicts per claim and rule.",
                          "| claim | rule | holds | contradicted | not resolved |", 5,
                          _summary_rows(entries, rules)), ""]
    for cell in dict.fromkeys(cell_name(e) for e in entries):
        rows = [(e["claim"], [_comparison_text(e), e["rule"], str(e["n"]), f"{e['mean']:+.2f}",
                              _interval_text(e),
                              _verdict_text(e) + (" (differs by rule)" if e["rule_dependent"] else "")])
                for e in entries if cell_name(e) == cell]
        md += [f"## {cell}", "", "| claim | comparison | rule | n | mean | 95% CI | verdict |",
               "|" + " --- |" * 7, *[f"| {c} | " + " | ".join(cells) + " |" for c, cells in rows], ""]
    return "\n".join(md)


def _forest_rows(entries: list) -> list:
    """The figure's rows: (group name, eta or None for C3's 'all etas'), groups in order, etas rising."""
    rows = dict.fromkeys((group_name(e), e["eta"]) for e in entries)
    return sorted(rows, key=lambda row: (list(dict.fromkeys(r[0] for r in rows)).index(row[0]),
                                         math.inf if row[1] is None else row[1]))


def claims_figure(entries: list, margin: float, stem: Path) -> list:
    """A forest plot: a panel per claim (C1 and C4 for the best round), a row per cell shared by the
    panels, one interval per rule; (!) marks a row where some verdict differs between rules. Rows are
    named by the settings that vary between cells; the others go to the title."""
    plt = pyplot()
    shown = [e for e in entries if is_headline(e)]
    claims = [c for c in CLAIM_TEXT if any(e["claim"] == c for e in shown)]
    rows = _forest_rows(shown)
    names = [k for k in shown[0] if k not in _NOT_SETTINGS or k == "dataset"]
    varying = {k for k in names if len({repr(e.get(k)) for e in shown}) > 1}
    labels = [("(!) " if any(e["rule_dependent"] and (group_name(e), e["eta"]) == row for e in shown) else "")
              + ", ".join(part for part in (group_name(_row_entry(shown, row), varying),
                                            eta_name({"eta": row[1]})) if part)
              for row in rows]
    rules = [r for r in RULE_TEXT if any(e["rule"] == r for e in shown)]
    label_in = 0.06 * max(len(label) for label in labels)
    fig, axes = plt.subplots(1, len(claims), sharey=True, squeeze=False, layout="constrained",
                             figsize=(2.9 * len(claims) + label_in, 0.28 * len(rows) + 1.6))
    for ax, claim in zip(axes[0], claims):
        for e in (e for e in shown if e["claim"] == claim):
            y = rows.index((group_name(e), e["eta"])) + (rules.index(e["rule"]) - (len(rules) - 1) / 2) * 0.22
            ax.plot(e["ci"], [y, y], color=RULE_COLOURS[e["rule"]], linewidth=1.4)
            ax.plot(e["mean"], y, "o", color=RULE_COLOURS[e["rule"]], markersize=3.5)
        ax.axvline(0, color="black", linewidth=0.7)
        if claim == "C2":
            ax.axvline(-margin, color="black", linewidth=0.7, linestyle="--")
        ax.set_title(f"{claim}: {CLAIM_TEXT[claim].split(':')[0]}", fontsize=8)
        ax.set_xlabel("slope (points / unit eta)" if claim == "C3" else "difference (points)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(range(len(rows)), labels, fontsize=7)
    axes[0, 0].set_ylim(len(rows) - 0.5, -0.5)
    handles = [plt.Line2D([], [], color=RULE_COLOURS[r], marker="o", markersize=3.5) for r in rules]
    texts = [RULE_TEXT[r] for r in rules]
    if "C2" in claims:
        handles.append(plt.Line2D([], [], color="black", linewidth=0.7, linestyle="--"))
        texts.append("C2's margin")
    if any(label.startswith("(!)") for label in labels):
        handles.append(plt.Line2D([], [], linestyle="none"))
        texts.append("(!) a verdict differs between rules")
    fig.legend(handles, texts, loc="outside lower center", ncol=len(texts), frameon=False, fontsize=8)
    constant = group_name(shown[0], [k for k in names if k not in varying])
    fig.suptitle(f"{constant}: paired differences over seeds, mean and {int(CONFIDENCE * 100)}% t interval",
                 fontsize=8)
    return save_figure(plt, fig, stem)


def _row_entry(entries: list, row: tuple) -> dict:
    return next(e for e in entries if (group_name(e), e["eta"]) == row)


def _json_entry(entry: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else
                v.item() if isinstance(v, np.generic) else v) for k, v in entry.items()}


def write_claims(records: list, out_dir: Path, title: str, margin: float, log=print) -> list:
    """claims.md / .json / .png / .pdf of the cells with >= MIN_SEEDS paired seeds; without any such
    cell one printed line instead, and the claim files an earlier report left are removed (stale)."""
    entries = grid_claims(records, margin)
    if not entries:
        for path in [out_dir / name for name in CLAIM_FILES if (out_dir / name).exists()]:
            path.unlink()
        log(f"claims not written: a verdict needs >= {MIN_SEEDS} seeds per cell, and this grid's cells have "
            f"at most {most_seeds_per_cell(records)}; add seeds to the recipe's manualSeed list")
        return []
    return [atomic_write_text(out_dir / "claims.md", claims_markdown(entries, title, margin)),
            atomic_write_text(out_dir / "claims.json",
                              json.dumps([_json_entry(e) for e in entries], indent=1) + "\n"),
            *claims_figure(entries, margin, out_dir / "claims")]
