"""The feature evidence as files, and the `--evidence` command.

For one feature source (a dataset through a backbone, or a features file), in its own folder
`<results>/evidence/<dataset>/<backbone>/` (a recipe's: `<results>/reports/<name>/evidence/...`):
  evidence.json    everything utils/evidence.py computes (the contract: `train` / `test` with `mean`
                   and `std` as K x K lists, and the table's `clusters`, `c`, `d`, `e`)
  correlation.*    the class-wise correlation heatmaps (mean and std, train and test), classes in
                   the order of the clustering that `cc` corruption uses
  dendrogram.*     that clustering, with class names and both cuts
  spectrum.*       the top Gram eigenvalues and the label energy along the top eigenvectors
  evidence.md/tex  the table row: clusters, c, d, e
For a set of sources (a recipe): the same table with one row per source and one heatmap figure on
one colour scale, beside the recipe's other reports.
"""
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from utils.cli import UserError
from utils.evidence import ORDER_CUT, TABLE_CUT, feature_evidence
from utils.io import atomic_write_text
from utils.report import latex_table, markdown_table, pyplot, save_figure

EVIDENCE_FILE = "evidence.json"
# Class names on the heatmap axes up to this many classes (beyond, they cannot be read).
NAMED_AXES_MAX = 40
# ... and on the dendrogram's leaves.
NAMED_LEAVES_MAX = 150
TABLE_CAPTION = ("Class-wise correlation of centred, L2-normalised features (train split): c = within a "
                 "class, d = between classes of one cluster, e = between clusters; each the mean over class "
                 "pairs of the mean correlation over all pairs of samples, ± the root mean of the per-pair "
                 "variances (the original's table printed that mean variance itself: `var` in "
                 f"evidence.json). Clusters: complete linkage cut at {TABLE_CUT} x the largest merge height.")


def evidence_folder(root, dataset: str, backbone: str) -> Path:
    return Path(root) / "evidence" / dataset / backbone


def _pm(summary) -> str:
    return "-" if summary is None else f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _table_rows(evidences: list) -> list:
    return [(ev["dataset"], [ev["backbone"], str(ev["num_classes"]), str(ev["clusters"]),
                             *(_pm(ev[part]) for part in "cde")]) for ev in evidences]


def evidence_tables(evidences: list, title: str) -> tuple:
    """(Markdown, LaTeX) of the c / d / e table, one row per source."""
    rows = _table_rows(evidences)
    head = "| dataset | backbone | classes | clusters | c | d | e |"
    md = [f"# {title}", ""] + markdown_table(TABLE_CAPTION, head, 7, rows) + [""]
    latex_rows = [(name, [cell.replace("±", r"$\pm$").replace("_", r"\_") for cell in cells])
                  for name, cells in rows]
    tex = latex_table(f"{title}. {TABLE_CAPTION}", "lllcccc",
                      "Dataset & Backbone & Classes & Clusters & $c$ & $d$ & $e$", latex_rows)
    return "\n".join(md), "\n".join(tex) + "\n"


def _class_labels(ev: dict) -> list:
    return ev["class_names"] or [str(c) for c in range(ev["num_classes"])]


def _cluster_edges(ev: dict) -> list:
    """Positions (in heatmap order) where one `cc` superclass ends and the next begins."""
    group_of = {c: g for g, members in enumerate(ev["superclasses"]) for c in members}
    ordered = [group_of[c] for c in ev["order"]]
    return [i + 0.5 for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]]


def _heatmap(ax, ev: dict, matrix, vmax: float, cmap: str, show_names: bool):
    order = ev["order"]
    image = ax.imshow(np.asarray(matrix, dtype=float)[np.ix_(order, order)], cmap=cmap, vmin=0.0, vmax=vmax,
                      interpolation="nearest")
    for edge in _cluster_edges(ev):
        ax.axhline(edge, color="white", linewidth=0.8)
        ax.axvline(edge, color="white", linewidth=0.8)
    if show_names:
        names = [_class_labels(ev)[c] for c in order]
        size = max(4.0, min(8.0, 240.0 / len(names)))
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=size)
        ax.set_yticks(range(len(names)), names, fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def correlation_figure(ev: dict, stem: Path) -> list:
    """Mean and std maps of both splits, one colour bar per column."""
    plt = pyplot()
    show = ev["num_classes"] <= NAMED_AXES_MAX
    side = 3.4 + (1.2 if show else 0.0)
    fig, axes = plt.subplots(2, 2, figsize=(2 * side + 1.2, 2 * side + 0.6), squeeze=False,
                             layout="constrained")
    std_max = max(float(np.nanmax(ev[s]["std"])) for s in ("train", "test")) or 1.0
    for row, split in enumerate(("train", "test")):
        mean_image = _heatmap(axes[row, 0], ev, ev[split]["mean"], 1.0, "viridis", show)
        std_image = _heatmap(axes[row, 1], ev, ev[split]["std"], std_max, "magma", show)
        axes[row, 0].set_title(f"{split}: mean correlation", fontsize=9)
        axes[row, 1].set_title(f"{split}: std over sample pairs", fontsize=9)
    fig.colorbar(mean_image, ax=axes[:, 0], shrink=0.6, label="mean (below 0 shown as 0)")
    fig.colorbar(std_image, ax=axes[:, 1], shrink=0.6, label="std")
    fig.suptitle(f"{ev['dataset']} / {ev['backbone']}: class-wise feature correlation "
                 f"(white lines: clusters at {ORDER_CUT} x max merge height)", fontsize=10)
    return save_figure(plt, fig, stem)


def dendrogram_figure(ev: dict, stem: Path) -> list:
    """The class tree (leaves named when there are at most NAMED_LEAVES_MAX classes), both cuts."""
    from scipy.cluster.hierarchy import dendrogram

    plt = pyplot()
    k, tree = ev["num_classes"], np.asarray(ev["tree"])
    named = k <= NAMED_LEAVES_MAX
    height = min(max(3.0, 0.16 * k + 1.2), 26.0)
    fig, ax = plt.subplots(figsize=(7.0, height))
    top = float(tree[:, 2].max())
    dendrogram(tree, ax=ax, orientation="left", labels=_class_labels(ev) if named else None,
               no_labels=not named, color_threshold=ORDER_CUT * top, above_threshold_color="grey",
               leaf_font_size=max(4.0, min(9.0, 400.0 / k)))
    ax.axvline(ORDER_CUT * top, color="black", linestyle="--", linewidth=0.8,
               label=f"{ORDER_CUT} x max: heatmap clusters and cc superclasses")
    ax.axvline(TABLE_CUT * top, color="black", linestyle=":", linewidth=0.8,
               label=f"{TABLE_CUT} x max: the table's clusters")
    ax.set_xlabel("complete-linkage merge height (rows of 1 - mean correlation)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.65 / (0.77 * height)), fontsize=8, frameon=False)
    ax.set_title(f"{ev['dataset']} / {ev['backbone']}: class clustering (train)", fontsize=10)
    return save_figure(plt, fig, stem)


def _energy_label(entry: dict) -> str:
    if entry["labels"] == "clean":
        return f"{entry['split']}, clean labels"
    return f"train, {entry['ctype']} eta {entry['eta']:g} seed {entry['seed']}"


def spectrum_figure(ev: dict, stem: Path) -> list:
    """Left: the top eigenvalues of the train Gram matrix; right: the share of each label set's
    centred energy in the span of the top m eigenvectors."""
    plt = pyplot()
    k = ev["num_classes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for split, style in (("train", "-"), ("test", "--")):
        spectrum = ev[split]["spectrum"]
        shares = np.asarray(spectrum["eigenvalues"][:4 * k]) / spectrum["trace"]
        left.plot(range(1, len(shares) + 1), shares, style, color="black", linewidth=1.0, label=split)
    left.set_yscale("log")
    left.set_xlabel("eigenvalue index")
    left.set_ylabel("Gram eigenvalue / trace")
    for ax in (left, right):
        ax.axvline(k - 1, color="tab:red", linewidth=0.8, linestyle=":")
    left.legend(fontsize=8, title=f"dotted: K - 1 = {k - 1}", title_fontsize=8)
    for entry in ev["label_energy"]:
        curve = entry["curve"][:4 * k]
        right.plot(range(1, len(curve) + 1), curve, linewidth=1.1, label=_energy_label(entry))
    right.set_ylim(0, 1.02)
    right.set_xlabel("top m eigenvectors")
    right.set_ylabel("share of the centred label energy")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{ev['dataset']} / {ev['backbone']}: Gram spectrum and label energy", fontsize=10)
    fig.tight_layout()
    return save_figure(plt, fig, stem)


def _json_ready(value):
    """evidence.json's content: NaN (an undefined std) as null, numpy values as plain numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_folder_free(folder: Path, features_id: str, overwrite: bool) -> None:
    """Refuse to replace the evidence of other features (same names, other content) unless asked."""
    path = folder / EVIDENCE_FILE
    if overwrite or not path.is_file():
        return
    try:
        found = json.loads(path.read_text()).get("features_id")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != features_id:
        raise UserError(f"{path} holds the evidence of other features (features_id {found}, these are "
                        f"{features_id}); pass --overwrite to replace it, or --results DIR for another "
                        "folder")


def write_source_evidence(ev: dict, folder: Path) -> list:
    """Every file of one source's evidence into `folder`; returns their paths."""
    saved = {key: value for key, value in ev.items() if key != "tree"}
    written = [atomic_write_text(folder / EVIDENCE_FILE, json.dumps(_json_ready(saved), indent=1) + "\n")]
    md, tex = evidence_tables([ev], f"{ev['dataset']} / {ev['backbone']}")
    written += [atomic_write_text(folder / "evidence.md", md),
                atomic_write_text(folder / "evidence.tex", tex)]
    written += correlation_figure(ev, folder / "correlation")
    written += dendrogram_figure(ev, folder / "dendrogram")
    written += spectrum_figure(ev, folder / "spectrum")
    return written


def set_correlation_figure(evidences: list, stem: Path, title: str) -> list:
    """The train mean maps of several sources side by side, on one colour scale (0 to 1)."""
    plt = pyplot()
    ncols = min(3, len(evidences))
    nrows = math.ceil(len(evidences) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.0, 3.6 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, ev in zip(axes.flat, evidences):
        image = _heatmap(ax, ev, ev["train"]["mean"], 1.0, "viridis", ev["num_classes"] <= 12)
        ax.set_title(f"{ev['dataset']} / {ev['backbone']} (K = {ev['num_classes']})", fontsize=9)
    for ax in axes.flat[len(evidences):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.7, label="mean correlation (below 0 shown as 0)")
    fig.suptitle(textwrap.fill(f"{title}: class-wise feature correlation (train)", 90), fontsize=10)
    return save_figure(plt, fig, stem)


def write_set_evidence(evidences: list, out_dir: Path, title: str) -> list:
    """The table of several sources and their heatmaps on one colour scale."""
    md, tex = evidence_tables(evidences, title)
    return [atomic_write_text(out_dir / "evidence.md", md), atomic_write_text(out_dir / "evidence.tex", tex),
            *set_correlation_figure(evidences, out_dir / "correlation", title)]


# ---- the commands ------------------------------------------------------------------------------
def summary_lines(ev: dict) -> list:
    """What a terminal shows of one source's evidence."""
    k, spectrum = ev["num_classes"], ev["train"]["spectrum"]
    gap = spectrum["gap_after_k_minus_1"]
    lines = [f"feature evidence of {ev['dataset']} / {ev['backbone']}: {k} classes, d = {ev['dim']}, "
             f"{ev['train']['rows']} train and {ev['test']['rows']} test rows",
             f"train: {ev['clusters']} clusters (cut {TABLE_CUT} x max), c = {_pm(ev['c'])}, "
             f"d = {_pm(ev['d'])}, e = {_pm(ev['e'])} (mean ± std of the correlation within a class / "
             "cluster / between)",
             f"train Gram spectrum: the top {k - 1} eigenvalues hold "
             f"{100 * spectrum['share_top_k_minus_1']:.1f}% of the trace"
             + (f", gap after the {k - 1}th: {gap:.2f}x" if gap else "")]
    shares = ", ".join(f"{_energy_label(e)}: {100 * e['share_top_k']:.1f}%" for e in ev["label_energy"])
    lines.append(f"label energy in the top {k} eigenvectors: {shares}")
    return lines


def grid_evidence(sources: dict, load, out_dir: Path, title: str, log=print) -> list:
    """The evidence of a recipe's feature sources: `sources` {source: [(ctype, eta, seed)]}, `load`
    (source) -> FeatureSet. Each under out_dir/evidence/<dataset>/<backbone>/, then the set's
    table and heatmaps in out_dir."""
    evidences, written = [], []
    for source, settings in sources.items():
        features = load(source)
        ev = feature_evidence(features, settings)
        written += write_source_evidence(ev, evidence_folder(out_dir, features.name, features.backbone))
        evidences.append(ev)
        for line in summary_lines(ev):
            log(line)
    return written + write_set_evidence(evidences, out_dir, title)
