"""What a run of the theory (numerical_solving.py) leaves behind, as utils/report.py is for training:
the names of its outputs, one array per round, the records (CSV and JSONL) and the figure. The
maths are in utils/theory.py; everything here writes through the atomic writers of utils/io.py.

The setting's part of every name and of the records' leading columns is derived from the
declarations of `theory.Setting` (its fields, in their order), so a new setting enters both.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from utils.io import atomic_save_figure, atomic_write_bytes, atomic_write_text
from utils.theory import SETTING_OPTIONS, Setting

SETTING_FIELDS = tuple(SETTING_OPTIONS)     # k, n, lbd, ... in declaration order
# A setting written with a word before its value: the seed as `seed0`, since a bare number there
# would read as one more parameter of the model.
TAG_PREFIX = {"seed": "seed"}


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

def name_value(value) -> str:
    """A setting's value as run names write it (floats in %g: 1e-05, 0.4)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_tag(s: Setting, solver: str, mode: str = "softmax", options: str = "",
            grid: dict | None = None) -> str:
    """The original's name `{K}_{n}_{lbd}_{c}_{d}_{eta}_{epsilon}` plus what the original left out
    (seed, matrix variant, label noise, solver, mode `softmax`/`linear`, and `options`: the run
    options that change the numbers when not at their defaults), so different runs never share a
    name. `grid`: a sweep's values per key, written in that key's place joined by '+'. A setting
    declared with a `neutral` value stays out of the name at that value (added after names existed)."""
    grid = grid or {}
    parts = []
    for key, opt in SETTING_OPTIONS.items():
        values = grid.get(key, [getattr(s, key)])
        if all(opt.is_neutral(v) for v in values):
            continue
        parts.append(TAG_PREFIX.get(key, "") + "+".join(name_value(v) for v in values))
    return "_".join(parts + [solver, mode]) + options


# ----------------------------------------------------------------------------------------------
# Arrays and records
# ----------------------------------------------------------------------------------------------

def save_round_array(path: Path, Y: torch.Tensor, true: torch.Tensor, given: torch.Tensor, round_: int,
                     info: dict):
    """One .npz per round (plain arrays, loadable with allow_pickle=False)."""
    buf = io.BytesIO()
    np.savez(buf, Y=Y.detach().cpu().numpy(), true_labels=true.numpy(), given_labels=given.numpy(),
             round=np.int64(round_), residual=np.float64(info.get("residual", 0.0)),
             iterations=np.int64(info.get("iterations", 0)))
    return atomic_write_bytes(path, buf.getvalue())


LEGEND_TITLE = "dots: solved fixed point\ncrosses: formula of the\nnoise-free block model"
CROSS_SHIFT = 0.15   # steps between the formula's crosses of neighbouring settings in the figure
CURVE_FIELDS = (*SETTING_FIELDS, "solver", "mode")     # what makes one curve of the figure: one run
RECORD_FIELDS = [*CURVE_FIELDS, "round", "clean", "noisy", "overall", "cf_clean", "cf_noisy", "cf_overall",
                 "cf_gap", "residual", "iterations", "work", "folds", "converged", "seconds", "t_star",
                 "min_eig_sym", "symmetric", "device", "dtype", "torch"]


def make_record(s: Setting, solver: str, approx: bool, r: dict, extra: dict) -> dict:
    rec = asdict(s)
    rec.update(solver=solver, mode="linear" if approx else "softmax", round=r["round"],
               clean=r["acc"]["clean"], noisy=r["acc"]["noisy"], overall=r["acc"]["overall"],
               cf_clean=r["cf_acc"]["clean"], cf_noisy=r["cf_acc"]["noisy"],
               cf_overall=r["cf_acc"]["overall"],
               cf_gap=r["cf_gap"], residual=r["residual"], iterations=r["iterations"], work=r["work"],
               folds=r["folds"], converged=r["converged"], seconds=round(r["seconds"], 4))
    rec.update(extra)
    return rec


def write_records(folder: Path, records: list[dict]) -> tuple[Path, Path]:
    """records.csv and records.jsonl, each rewritten atomically (a reader never sees half a file)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow(rec)
    csv_path = atomic_write_text(folder / "records.csv", buf.getvalue())
    jsonl = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
    return csv_path, atomic_write_text(folder / "records.jsonl", jsonl)


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------

def setting_label(rec: dict, varying: list[str]) -> str:
    if not varying:
        return f"{rec['solver']} ({rec['mode']})"
    return ", ".join(f"{key}={rec[key]:g}" if isinstance(rec[key], float) else f"{key}={rec[key]}"
                     for key in varying)


def draw_figure(folder: Path, records: list[dict], varying: list[str], title: str) -> list[Path]:
    """The figure of `theory_figure`, saved as folder/figure.png and .pdf."""
    import matplotlib.pyplot as plt

    fig = theory_figure(records, varying, title)
    paths = atomic_save_figure(fig, folder / "figure", bbox_inches="tight")
    plt.close(fig)
    return paths


def theory_figure(records: list[dict], varying: list[str], title: str):
    """The paper's picture for this experiment: accuracy of clean and of noisy samples against the
    step (0: the given labels, 1: the teacher, t + 1: the student of distillation round t), one
    colour per setting: the solved fixed point (dots joined by a line) and the noise-free block
    model's formula (crosses only: it exists at whole steps; with several settings each one's
    crosses are shifted a little sideways, so equal values do not hide each other). The legend
    sits outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict = {}
    for rec in records:
        groups.setdefault(tuple((k, rec[k]) for k in CURVE_FIELDS), []).append(rec)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, recs in enumerate(groups.values()):
        recs = sorted(recs, key=lambda r: r["round"])
        steps = [r["round"] for r in recs]
        shift = CROSS_SHIFT * (i - (len(groups) - 1) / 2)
        color = colors[i % len(colors)]
        label = setting_label(recs[0], varying)
        for ax, part in zip(axes, ("clean", "noisy")):
            ax.plot(steps, [r[part] for r in recs], "-o", color=color, ms=3, label=label)
            ax.plot([t + shift for t in steps], [r["cf_" + part] for r in recs], linestyle="none", marker="x",
                    ms=5, color=color)
    for ax, part in zip(axes, ("clean", "noisy")):
        ax.set_title(f"{part} samples (given label {'correct' if part == 'clean' else 'corrupted'})")
        ax.set_xlabel("step (0: the given labels, 1: the teacher)")
        ax.set_ylim(-3, 103)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy against the true class (%)")
    axes[1].legend(fontsize=8, title=LEGEND_TITLE, title_fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
