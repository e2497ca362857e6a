"""Reports from synthetic records: table numbers against a hand computation, bold, missing cells,
metric choice, captions, figure files; and every shipped recipe parses."""
import csv
from pathlib import Path

import numpy as np
import pytest

from utils.report import METRIC_DESCRIPTION, distillation_gains, distillation_table, group_records, write_reports

REPO = Path(__file__).resolve().parent.parent


def record(dataset, step, eta, seed, acc, last=None, wd=5e-4, byval=None):
    r = {"key": f"{dataset}-{step}-{eta}-{seed}-{wd}", "dataset": dataset, "backbone": "resnet34", "ctype": "cc",
         "eta": eta, "seed": seed, "step": step, "lr": 0.05, "wd": wd, "momentum": 0.9, "gamma": 0.98,
         "epochs": 200, "train_batch": 128, "label_smoothing": 0.0, "val_split": 0.0, "val_clean": False,
         "test_acc_bytest": acc, "test_acc_last": acc - 1.0 if last is None else last, "test_acc_byval": byval}
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
        assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals)) and n == 3
    assert table["cells"]["2", 0.9] is None
    assert table["best"] == {0.5: pytest.approx(84.0), 0.9: pytest.approx(59.0)}


def test_groups_split_on_every_varying_setting_but_seed_and_eta():
    groups = group_records(synthetic())
    assert [(g["dataset"], g["wd"]) for g, _ in groups] == [("A", 5e-4), ("B", 5e-5)]
    assert len(groups[1][1]) == 3


def test_markdown_and_latex_tables(tmp_path):
    written = write_reports(synthetic(), tmp_path, GRID)
    assert {p.name for p in written} == {"tables.md", "tables.tex", "records.csv", "gain.png", "gain.pdf"}
    md = (tmp_path / "tables.md").read_text()
    a_md = md.split("## B")[0]
    a_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
              for line in a_md.splitlines() if line.startswith("| ") and "eta" not in line}
    assert a_rows["1 (Teacher)"] == ["82.00 ± 1.63", "42.00 ± 2.16"]
    assert a_rows["2"] == ["**84.00 ± 2.94**", "52.00 ± 1.63"]
    assert a_rows["3"] == ["79.00 ± 0.00", "-"]
    assert a_rows["PLL"] == ["71.00 ± 0.82", "**59.00 ± 2.94**"]
    b_md = md.split("## B")[1]
    assert "n = 1 seed " in b_md and "62.00 ± 0.00" in b_md
    tex = (tmp_path / "tables.tex").read_text()
    assert r"\textbf{84.00 $\pm$ 2.94}" in tex and r"1 (Teacher) & 82.00 $\pm$ 1.63 & 42.00 $\pm$ 2.16 \\" in tex
    assert tex.count(r"\begin{table}") == 2
    for path in ("gain.png", "gain.pdf"):
        assert (tmp_path / path).stat().st_size > 1000
    with open(tmp_path / "records.csv") as f:
        rows_csv = list(csv.DictReader(f))
    assert len(rows_csv) == len(synthetic()) and rows_csv[0]["test_acc_byval"] == ""


def test_missing_seed_is_marked_and_ties_are_all_bold(tmp_path):
    recs = [r for r in synthetic() if not (r["dataset"] == "A" and r["step"] == "p" and r["seed"] == 2)]
    recs = [dict(r, test_acc_bytest=82.0) if r["dataset"] == "A" and r["step"] == "1" and r["eta"] == 0.5 else r
            for r in recs]
    write_reports(recs, tmp_path, GRID)
    md = (tmp_path / "tables.md").read_text().split("## B")[0]
    assert "**82.00 ± 1.63**" in md and "**82.00 ± 0.00**" in md
    assert "**61.00 ± 1.00** (n=2)" in md and "70.50 ± 0.50 (n=2)" in md


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
    assert gains["p", 0.9][0] == pytest.approx(diff.mean()) and gains["p", 0.9][1] == pytest.approx(diff.std())
    assert ("2", 0.9) not in gains


def test_ls_temperature_kind_writes_tables(tmp_path):
    recs = [dict(record("A", "0", 0.5, s, 80.0 + s), label_smoothing=a, test_top2_bytest=95.0) for s in range(2)
            for a in (0.0, 0.1)]
    recs += [dict(record("A", "1", 0.5, s, 70.0 + t), label_smoothing=a, temperature=float(t), test_top2_bytest=90.0)
             for s in range(2) for a in (0.0, 0.1) for t in (1, 4)]
    write_reports(recs, tmp_path, dict(GRID, report={"kind": "ls_temperature", "metric": "test"}))
    md = (tmp_path / "tables.md").read_text()
    assert "| Teacher | 80.50 / 95.00 |" in md and "| Student T = 4 | 74.00 / 90.00 |" in md


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
