"""Reports from synthetic records: table numbers against a hand computation (sample std), bold
within one std, missing cells, one-seed cells, metric choice, captions, records.csv rounding, the
gain figure's shared y-axis and step names, the training-curve figure from log.jsonl files (and
its skip without them); and every shipped recipe parses."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import utils.report
from utils.report import (METRIC_DESCRIPTION, curve_etas, distillation_gains, distillation_table,
                          group_records, log_path, records_csv, write_reports)

REPO = Path(__file__).resolve().parent.parent


def record(dataset, step, eta, seed, acc, last=None, wd=5e-4, byval=None):
    r = {"key": f"{dataset}-{step}-{eta}-{seed}-{wd}", "dataset": dataset, "backbone": "resnet34",
         "ctype": "cc", "eta": eta, "seed": seed, "step": step, "lr": 0.05, "wd": wd, "momentum": 0.9,
         "gamma": 0.98, "epochs": 200, "train_batch": 128, "label_smoothing": 0.0, "val_split": 0.0,
         "val_clean": False, "test_acc_bytest": acc, "test_acc_last": acc - 1.0 if last is None else last,
         "test_acc_byval": byval, "features_id": "f00d"}
    if step != "0":
        r.update(temperature=1.0, selection="test")
    return r


# Hand-made accuracies: dataset A, eta 0.5 and 0.9, seeds 0-2; round 2 at eta 0.9 never finished.
ACC = {("0", 0.5): [80.0, 82.0, 84.0], ("1", 0.5): [81.0, 83.0, 88.0], ("2", 0.5): [79.0, 79.0, 79.0],
       ("p", 0.5): [70.0, 71.0, 72.0],
       ("0", 0.9): [40.0, 41.0, 45.0], ("1", 0.9): [50.0, 52.0, 54.0], ("p", 0.9): [60.0, 62.0, 55.0]}


def synthetic():
    recs = [record("A", s, e, seed, v) for (s, e), vals in ACC.items() for seed, v in enumerate(vals)]
    recs += [record("B", s, 0.5, 0, 60.0 + i, wd=5e-5) for i, s in enumerate(["0", "1", "p"])]
    return recs


GRID = {"name": "t", "title": "Synthetic", "rounds": 2, "report": {"kind": "distillation", "metric": "test"}}


def test_table_cells_equal_hand_computation():
    (settings, members), _ = group_records(synthetic())
    assert settings["dataset"] == "A"
    table = distillation_table(members, "test")
    for (step, eta), vals in ACC.items():
        mean, std, n = table["cells"][step, eta]
        assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals, ddof=1)) and n == 3
    assert table["cells"]["2", 0.9] is None
    assert table["best"] == {0.5: pytest.approx(84.0), 0.9: pytest.approx(59.0)}
    # bold: the best and what lies within one std of it (larger std of the pair): 82 +- 2 is within
    # 3.61 of 84 +- 3.61, 79 is not; at eta 0.9, 52 is 7 below 59 +- 3.61
    assert table["bold"] == {0.5: {"0", "1"}, 0.9: {"p"}}


def test_bold_marks_only_what_one_std_does_not_separate():
    def members(second):
        return [record("A", "0", 0.5, s, v) for s, v in enumerate([90.0, 90.0, 90.0])] + \
               [record("A", "1", 0.5, s, v) for s, v in enumerate(second)]
    # second step 1 point below with std 0.1: clearly separated, only the best is bold
    assert distillation_table(members([88.9, 89.0, 89.1]), "test")["bold"][0.5] == {"0"}
    # 1 point below with std 2: within one std, both bold
    assert distillation_table(members([87.0, 89.0, 91.0]), "test")["bold"][0.5] == {"0", "1"}


def test_groups_split_on_every_varying_setting_but_seed_and_eta():
    groups = group_records(synthetic())
    assert [(g["dataset"], g["wd"]) for g, _ in groups] == [("A", 5e-4), ("B", 5e-5)]
    assert len(groups[1][1]) == 3


def test_markdown_and_latex_tables(tmp_path):
    written = write_reports(synthetic(), tmp_path, GRID)
    assert {p.name for p in written} == {"tables.md", "tables.tex", "records.csv", "gain.png", "gain.pdf",
                                         "captions.md"}
    md = (tmp_path / "tables.md").read_text()
    a_md = md.split("## B")[0]
    a_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
              for line in a_md.splitlines() if line.startswith("| ") and "eta" not in line}
    assert a_rows["1 (Teacher)"] == ["**82.00 ± 2.00**", "42.00 ± 2.65"]
    assert a_rows["2"] == ["**84.00 ± 3.61**", "52.00 ± 2.00"]
    assert a_rows["3"] == ["79.00 ± 0.00", "-"]
    assert a_rows["PLL"] == ["71.00 ± 1.00", "**59.00 ± 3.61**"]
    assert "sample std, ddof=1" in a_md and "within one std" in a_md
    b_md = md.split("## B")[1]
    # one seed: the mean alone, no '± 0.00', and the caption says why
    assert "n = 1 seed (one seed: no std)" in b_md and "| **62.00** |" in b_md
    assert "±" not in b_md.split("\n\n", 2)[2]
    tex = (tmp_path / "tables.tex").read_text()
    assert r"\textbf{84.00 $\pm$ 3.61}" in tex
    assert r"1 (Teacher) & \textbf{82.00 $\pm$ 2.00} & 42.00 $\pm$ 2.65 \\" in tex
    assert tex.count(r"\begin{table}") == 2
    for path in ("gain.png", "gain.pdf"):
        assert (tmp_path / path).stat().st_size > 1000
    with open(tmp_path / "records.csv") as f:
        rows_csv = list(csv.DictReader(f))
    assert len(rows_csv) == len(synthetic()) and rows_csv[0]["test_acc_byval"] == ""
    header = list(rows_csv[0])
    assert header[header.index("step") + 1] == "step_label"  # the tables' name beside the stored code
    assert [(r["step"], r["step_label"]) for r in rows_csv[:4]] == [("0", "1 (Teacher)"), ("1", "2"),
                                                                    ("2", "3"), ("p", "PLL")]


def test_missing_seed_is_marked_and_ties_are_all_bold(tmp_path):
    recs = [r for r in synthetic() if not (r["dataset"] == "A" and r["step"] == "p" and r["seed"] == 2)]
    recs = [dict(r, test_acc_bytest=82.0) if (r["dataset"], r["step"], r["eta"]) == ("A", "1", 0.5) else r
            for r in recs]
    write_reports(recs, tmp_path, GRID)
    md = (tmp_path / "tables.md").read_text().split("## B")[0]
    assert "**82.00 ± 2.00**" in md and "**82.00 ± 0.00**" in md
    assert "**61.00 ± 1.41** (n=2)" in md and "70.50 ± 0.71 (n=2)" in md


def test_a_one_seed_cell_among_three_shows_no_std(tmp_path):
    recs = [r for r in synthetic() if not (r["dataset"] == "A" and r["step"] == "p" and r["seed"] > 0)]
    write_reports(recs, tmp_path, GRID)
    md = (tmp_path / "tables.md").read_text().split("## B")[0]
    pll = next(line for line in md.splitlines() if line.startswith("| PLL |"))
    assert pll == "| PLL | 70.00 (n=1) | **60.00** (n=1) |"


@pytest.mark.parametrize("metric, field", [("test", "test_acc_bytest"), ("last", "test_acc_last"),
                                           ("val", "test_acc_byval")])
def test_metric_choice_reads_its_field_and_names_it(tmp_path, metric, field):
    recs = [dict(r, test_acc_last=10.0 + r["seed"], test_acc_byval=20.0 + r["seed"]) for r in synthetic()]
    table = distillation_table(group_records(recs)[0][1], metric)
    expected = {"test_acc_bytest": 82.0, "test_acc_last": 11.0, "test_acc_byval": 21.0}[field]
    assert table["cells"]["0", 0.5][0] == pytest.approx(expected)
    write_reports(recs, tmp_path, dict(GRID, report={"kind": "distillation", "metric": metric}))
    assert METRIC_DESCRIPTION[metric] in (tmp_path / "tables.md").read_text()
    assert METRIC_DESCRIPTION[metric].split(" (")[0] in (tmp_path / "tables.tex").read_text()


def test_val_metric_without_val_split_shows_dashes(tmp_path):
    write_reports(synthetic(), tmp_path, dict(GRID, report={"kind": "distillation", "metric": "val"}))
    md = (tmp_path / "tables.md").read_text()
    assert "±" not in md.split("## A")[1] and "needs val_split > 0" in md


def test_gain_is_student_minus_same_seed_teacher():
    members = group_records(synthetic())[0][1]
    gains = distillation_gains(members, "test", [0.5, 0.9])
    diff = np.array(ACC["p", 0.9]) - np.array(ACC["0", 0.9])
    assert gains["p", 0.9][0] == pytest.approx(diff.mean())
    assert gains["p", 0.9][1] == pytest.approx(diff.std(ddof=1))
    assert ("2", 0.9) not in gains


def test_ls_temperature_kind_writes_tables(tmp_path):
    recs = [dict(record("A", "0", 0.5, s, 80.0 + s), label_smoothing=a, test_top2_bytest=95.0)
            for s in range(2) for a in (0.0, 0.1)]
    recs += [dict(record("A", "1", 0.5, s, 70.0 + t), label_smoothing=a, temperature=float(t),
                  test_top2_bytest=90.0)
             for s in range(2) for a in (0.0, 0.1) for t in (1, 4)]
    write_reports(recs, tmp_path, dict(GRID, report={"kind": "ls_temperature", "metric": "test"}))
    md = (tmp_path / "tables.md").read_text()
    assert "| Teacher | 80.50 ± 0.71 / 95.00 ± 0.00 |" in md
    assert "| Student T = 4 | 74.00 ± 0.00 / 90.00 ± 0.00 |" in md
    assert "sample std, ddof=1" in md
    # one seed: means alone
    write_reports([r for r in recs if r["seed"] == 0], tmp_path,
                  dict(GRID, report={"kind": "ls_temperature"}))
    md = (tmp_path / "tables.md").read_text()
    assert "| Teacher | 80.00 / 95.00 |" in md and "n = 1 seed (one seed: no std)" in md


def test_records_csv_rounds_measured_floats_only():
    r = dict(record("A", "1", 0.5, 0, 95.00000762939453), lr=5e-5, wd=2e-5,
             test_entropy_bytest=1.7491470575332642, realised_corruption=49.965205288796106, epoch_bytest=42,
             wall_time_s=2.3442742824554443, fused_batches=False)
    row = next(csv.DictReader(records_csv([r]).splitlines()))
    assert row["test_acc_bytest"] == "95.0" and row["test_acc_last"] == "94.0"
    assert row["test_entropy_bytest"] == "1.749147" and row["realised_corruption"] == "49.9652"
    assert row["lr"] == "5e-05" and row["wd"] == "2e-05" and row["eta"] == "0.5"  # settings untouched
    assert row["epoch_bytest"] == "42" and row["step"] == "1" and row["fused_batches"] == "False"
    assert row["wall_time_s"] == "2.3442742824554443" and row["test_acc_byval"] == ""


def _capture_figures(monkeypatch):
    """Figures handed to atomic_save_figure, by file stem, before they are closed."""
    import matplotlib
    matplotlib.use("Agg")
    saved = {}
    real = utils.report.atomic_save_figure

    def spy(fig, stem, **kwargs):
        saved[Path(stem).name] = {"axes": list(fig.axes), "legends": [t.get_text() for lg in fig.legends
                                                                      for t in lg.get_texts()],
                                  "title": fig.get_suptitle()}
        return real(fig, stem, **kwargs)
    monkeypatch.setattr(utils.report, "atomic_save_figure", spy)
    return saved


def test_gain_figure_shares_its_y_axis_and_names_steps_as_the_tables(tmp_path, monkeypatch):
    saved = _capture_figures(monkeypatch)
    recs = synthetic() + [dict(r, selection="val", key=r["key"] + "-val")
                          for r in synthetic() if r["step"] != "0"]
    write_reports(recs, tmp_path, GRID)
    axes = saved["gain"]["axes"]
    panels = [ax for ax in axes if ax.get_visible() and ax.axison]
    assert len(panels) == 4  # A and B, each under two rules
    assert all(ax.get_ylim() == panels[0].get_ylim() for ax in panels)
    assert all(panels[0].get_shared_y_axes().joined(panels[0], ax) for ax in panels)
    assert saved["gain"]["legends"] == ["2", "3", "PLL"]  # the tables' row names, not 't = 1'


def test_figures_have_one_line_subtitles_and_captions_md_the_rest(tmp_path, monkeypatch):
    """Under the recipe's title, one short line; the full captions go to captions.md. The gain
    figure shows each panel's teacher accuracy (mean over seeds) under its corruption rate."""
    saved = _capture_figures(monkeypatch)
    recs = [r for r in synthetic() if r["dataset"] == "A"]
    write_logs(recs, tmp_path / "ckpt", lambda r: [50.0, 60.0])
    write_reports(recs, tmp_path / "out", GRID, checkpoint_root=tmp_path / "ckpt")
    assert saved["gain"]["title"] == ("Synthetic\nGain over the same seed's teacher (step 1): mean ± std "
                                      "over 3 seeds, best-by-test accuracy")
    assert saved["curves"]["title"] == ("Synthetic\nTest accuracy per epoch, mean over 3 seeds; dashed: the "
                                        "steps' mean best-by-test accuracy")
    ticks = [t.get_text() for t in saved["gain"]["axes"][0].get_xticklabels()]
    assert ticks == ["0.5\nteacher 82.0%", "0.9\nteacher 42.0%"]  # mean of 80, 82, 84 and of 40, 41, 45
    assert (tmp_path / "out" / "captions.md").read_text() == (
        "# Synthetic: figure captions\n\n"
        "`gain.png`, `gain.pdf`: Distillation gain (points) = a student step's test accuracy minus the "
        "same seed's teacher's (step 1); mean and std (sample std, ddof=1) over 3 seeds. Below each "
        "corruption rate: the teacher's own accuracy (mean over seeds). Number: "
        f"{METRIC_DESCRIPTION['test']}.\n\n"
        "`curves.png`, `curves.pdf`: Test accuracy per epoch, mean over 3 seeds. Solid: the curve, whose end "
        "is the last-epoch number; dashed: the mean of each run's best-by-test accuracy (the paper's "
        "number). Their distance is what choosing the epoch on the test set adds. The y-range leaves out "
        "the first 5% of epochs.\n")


# ---- the training-curve figure -------------------------------------------------------------
def write_logs(records, root, curve):
    """A log.jsonl per record where the report looks for it; test_acc per epoch = curve(record)."""
    for r in records:
        path = log_path(root, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"epoch": e + 1, "test_acc": float(v), "lr": 0.1}) + "\n"
                                for e, v in enumerate(curve(r))))


def test_curve_etas_are_the_lowest_and_highest_gain_etas():
    assert curve_etas([0.0, 0.3, 0.5, 0.7, 0.9], [0.5, 0.7, 0.9]) == [0.5, 0.9]
    assert curve_etas([0.0, 0.5], [0.5, 0.7, 0.9]) == [0.5]
    assert curve_etas([0.0, 0.3], [0.5, 0.9]) == [0.0, 0.3]  # none of the gain etas ran: the grid's own


def test_curves_figure_draws_the_seed_mean_per_epoch(tmp_path, monkeypatch):
    saved = _capture_figures(monkeypatch)
    recs = [r for r in synthetic() if r["dataset"] == "A"]
    # epoch e of seed s: 10 s + e, with the step's offset; the best is then the last epoch + 5 at epoch 2
    offset = {"0": 0.0, "1": 100.0, "2": 200.0, "p": 300.0}
    write_logs(recs, tmp_path / "ckpt",
               lambda r: [offset[r["step"]] + 10 * r["seed"] + e + (5 if e == 1 else 0) for e in range(4)])
    grid = dict(GRID, report={"kind": "distillation", "gain_etas": [0.5, 0.9]})
    written = write_reports(recs, tmp_path / "out", grid, checkpoint_root=tmp_path / "ckpt")
    assert {p.name for p in written} >= {"curves.png", "curves.pdf"}
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    axes = saved["curves"]["axes"]
    assert [ax.get_title().rsplit("eta = ", 1)[1] for ax in axes] == ["0.5", "0.9"]
    solid = {round(line.get_ydata()[0]): list(line.get_ydata()) for line in axes[0].get_lines()
             if line.get_linestyle() == "-"}
    # teacher, last round (step 3: round 2) and PLL at eta 0.5, mean over seeds 0..2 (seed mean 10)
    assert solid == {10: [10.0, 16.0, 12.0, 13.0], 210: [210.0, 216.0, 212.0, 213.0],
                     310: [310.0, 316.0, 312.0, 313.0]}
    dashed = sorted(line.get_ydata()[0] for line in axes[0].get_lines() if line.get_linestyle() == "--")
    assert dashed == [16.0, 216.0, 316.0]
    # at eta 0.9 the last round (round 2) never finished: as in the table ('-'), no line
    solid_at_09 = {round(line.get_ydata()[0]) for line in axes[1].get_lines() if line.get_linestyle() == "-"}
    assert solid_at_09 == {10, 310}
    assert saved["curves"]["legends"] == ["1 (Teacher)", "3", "PLL", "per epoch (mean)",
                                          "best-by-test (mean)"]


def test_missing_logs_skip_the_curves_with_one_line(tmp_path, capsys):
    recs = [r for r in synthetic() if r["dataset"] == "A"]
    write_logs(recs, tmp_path / "ckpt", lambda r: [50.0, 60.0])
    out = tmp_path / "out"
    assert "curves.png" in {p.name for p in write_reports(recs, out, GRID, checkpoint_root=tmp_path / "ckpt")}
    capsys.readouterr()
    # the store copied without its checkpoints: tables and gain figure as usual, no curves, one line
    written = write_reports(recs, out, GRID, checkpoint_root=tmp_path / "elsewhere")
    assert {p.name for p in written} == {"tables.md", "tables.tex", "records.csv", "gain.png", "gain.pdf",
                                         "captions.md"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "training curves skipped" in lines[0] and "log.jsonl" in lines[0]
    assert "removed the stale curves.png, curves.pdf" in lines[0]
    assert not (out / "curves.png").exists() and not (out / "curves.pdf").exists()
    # one damaged log is enough to skip (a mean over fewer seeds would not be the tables' runs)
    log_path(tmp_path / "ckpt", recs[0]).write_text("{not json\n")
    write_reports(recs, out, GRID, checkpoint_root=tmp_path / "ckpt")
    assert "training curves skipped" in capsys.readouterr().out and not (out / "curves.png").exists()
    write_reports(recs, out, GRID)  # no checkpoint root at all
    assert "no checkpoint root" in capsys.readouterr().out


def test_grid_command_draws_curves_from_its_checkpoint_root(cli, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\nrounds: 1\ngrid: {dataset: digits, corruption: [0.5], manualSeed: [0, 1], "
                      "lr: 0.05, wd: 5.0e-3, epochs: 3}\nreport: {kind: distillation, metric: test}\n")
    assert cli("--config", recipe) == 0
    report = cli.dirs()["results"] / "reports" / "tiny"
    assert (report / "curves.png").stat().st_size > 1000
    import shutil
    shutil.rmtree(cli.dirs()["ckpt"])
    capsys.readouterr()
    assert cli("--config", recipe, "--report-only") == 0
    out = capsys.readouterr().out
    assert out.count("training curves skipped") == 1 and not (report / "curves.png").exists()


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "theory").glob("*.yaml")), ids=lambda p: p.name)
def test_every_theory_recipe_parses(path):
    import numerical_solving

    numerical_solving.load_config(str(path), numerical_solving.build_parser())


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(path):
    from utils.grid import load_grid

    grid = load_grid(path)
    settings = [grid["grid"]] + list((grid.get("per_dataset") or {}).values())
    for body in settings:
        for key in ("lr", "wd", "corruption"):
            values = body.get(key, [])
            for v in values if isinstance(values, list) else [values]:
                assert isinstance(v, (int, float)), f"{path.name}: {key} {v!r} is not a number (write 5.0e-5)"


def test_selected_metric_reads_each_rule_and_the_shared_teacher_under_each():
    """One teacher record (no `selection`: it trains the same under every rule) serves a `test`, a
    `val` and a `last` chain; under `metric: selected` each group reads the teacher and its students
    with the group's own rule."""
    teacher = record("A", "0", 0.5, 0, 90.0, last=85.0, byval=88.0)
    students = []
    for rule, acc in (("test", 70.0), ("val", 60.0), ("last", 50.0)):
        s = record("A", "1", 0.5, 0, acc, last=acc - 5, byval=acc - 2)
        s.update(selection=rule, key=f"s-{rule}")
        students.append(s)
    groups = group_records([teacher] + students)
    assert [g["selection"] for g, _ in groups] == ["test", "val", "last"]
    got = {g["selection"]: distillation_table(m, "selected")["cells"] for g, m in groups}
    assert got["test"]["0", 0.5][0] == 90.0 and got["test"]["1", 0.5][0] == 70.0
    assert got["val"]["0", 0.5][0] == 88.0 and got["val"]["1", 0.5][0] == 58.0
    assert got["last"]["0", 0.5][0] == 85.0 and got["last"]["1", 0.5][0] == 45.0
    assert "selection" not in teacher  # the store's record is not modified
