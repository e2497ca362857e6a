"""Claims: the paired t interval against its formula and its coverage on simulated data, each
verdict on constructed records where the answer is known (an effect far from zero holds, none is
not resolved, a reversed one is contradicted), the best round chosen on validation, the rule-
dependent mark, C3's slope, and the report files (written, or skipped in one line with stale ones
removed); then a small digits grid end to end."""
import json

import numpy as np
import pytest
from scipy import stats

from utils.claims import (CONTRADICTED, HOLDS, UNRESOLVED, best_round, grid_claims, paired_interval,
                          per_seed_slopes)
from utils.claims_report import write_claims
from utils.steps import Step

SEEDS = range(5)
NOISE = [0.3, -0.2, 0.1, -0.4, 0.2]  # per-seed wobble, so intervals are not degenerate


def record(step, eta, seed, acc, last=None, val=None, dataset="A"):
    r = {"key": f"{dataset}-{step}-{eta}-{seed}", "dataset": dataset, "backbone": "resnet34", "ctype": "cc",
         "eta": eta, "seed": seed, "step": step, "lr": 0.05, "wd": 5e-4, "momentum": 0.9, "gamma": 0.98,
         "epochs": 200, "train_batch": 128, "label_smoothing": 0.0,
         "val_split": 0.1 if val is not None else 0.0,
         "val_clean": False, "test_acc_bytest": acc, "test_acc_last": acc if last is None else last,
         "test_acc_byval": acc if val is not None else None, "val_acc_byval": val, "features_id": "f"}
    if step != "0":
        r.update(temperature=1.0, selection="test")
    return r


def chain(eta, offsets, last_offsets=None, val_offsets=None):
    """Records of one cell: step code -> accuracy offset from a teacher at 70 (per-seed noise added)."""
    out = []
    for step, offset in offsets.items():
        for seed in SEEDS:
            acc = 70 + offset + NOISE[seed] * (step != "0")
            last = None if last_offsets is None else 70 + last_offsets[step] + NOISE[seed] * (step != "0")
            val = None if val_offsets is None else 60 + val_offsets[step] + NOISE[seed]
            out.append(record(step, eta, seed, acc, last, val))
    return out


def verdicts(entries, claim, comparison, rule="test"):
    return [e["verdict"] for e in entries if e["claim"] == claim and e["comparison"] == comparison
            and e["rule"] == rule]


def test_interval_is_the_t_interval_of_the_differences():
    d = [1.0, 2.5, 0.5, 3.0]
    iv = paired_interval(d)
    half = stats.t.ppf(0.975, 3) * np.std(d, ddof=1) / np.sqrt(4)
    assert (iv.n, iv.mean) == (4, pytest.approx(1.75))
    assert (iv.low, iv.high) == (pytest.approx(1.75 - half), pytest.approx(1.75 + half))
    same = paired_interval([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    draws = rng.normal(0.7, 2.0, size=(1000, 5))
    covered = sum(iv.low <= 0.7 <= iv.high for iv in map(paired_interval, draws))
    assert 920 <= covered <= 980


@pytest.mark.parametrize("effect,expected", [(5.0, HOLDS), (0.0, UNRESOLVED), (-5.0, CONTRADICTED)])
def test_c1_verdict_follows_the_effect(effect, expected):
    entries = grid_claims(chain(0.5, {"0": 0.0, "1": effect, "p": 0.0}))
    assert verdicts(entries, "C1", "best round - teacher") == [expected]
    assert verdicts(entries, "C1", "step 2 - teacher") == [expected]


@pytest.mark.parametrize("pll,expected,beats", [(3.0, HOLDS, True), (-0.5, HOLDS, False),
                                                (-1.0, UNRESOLVED, False), (-6.0, CONTRADICTED, False)])
def test_c2_non_inferiority_at_the_margin(pll, expected, beats):
    entries = grid_claims(chain(0.5, {"0": 0.0, "1": 2.0, "p": 2.0 + pll}), margin=1.0)
    (c2,) = [e for e in entries if e["claim"] == "C2" and e["rule"] == "test"]
    assert (c2["verdict"], c2["beats"], c2["margin"]) == (expected, beats, 1.0)
    assert c2["mean"] == pytest.approx(pll, abs=0.5)


def test_c4_more_rounds_hurt_and_a_best_last_round_contradicts():
    hurt = grid_claims(chain(0.5, {"0": 0.0, "1": 4.0, "2": 2.0, "3": -3.0, "p": 0.0}))
    (c4,) = [e for e in hurt if e["claim"] == "C4" and e["rule"] == "test"]
    assert (c4["verdict"], c4["best_step"], c4["last_is_best"]) == (HOLDS, "2", False)
    rising = grid_claims(chain(0.5, {"0": 0.0, "1": 1.0, "2": 2.0, "p": 0.0}))
    (c4,) = [e for e in rising if e["claim"] == "C4" and e["rule"] == "test"]
    assert (c4["verdict"], c4["last_is_best"], c4["mean"]) == (CONTRADICTED, True, 0.0)


def test_best_round_is_chosen_on_validation_when_there_is_a_split():
    members = chain(0.5, {"0": 0.0, "1": 5.0, "2": 1.0, "p": 0.0},
                    val_offsets={"0": 0, "1": 0, "2": 3, "p": 0})
    assert best_round(members, "test") == (Step.student(2), "val")
    no_val = chain(0.5, {"0": 0.0, "1": 5.0, "2": 1.0, "p": 0.0})
    assert best_round(no_val, "test") == (Step.student(1), "test")
    (c1,) = [e for e in grid_claims(members)
             if e["comparison"] == "best round - teacher" and e["rule"] == "val"]
    assert (c1["best_step"], c1["best_chosen_on"]) == ("3", "val")


def test_a_verdict_that_differs_between_rules_is_marked():
    # best-by-test: the round gains 4 points; at the last epoch it loses 4. PLL holds C2 under both.
    members = chain(0.5, {"0": 0.0, "1": 4.0, "p": 4.0}, last_offsets={"0": 0.0, "1": -4.0, "p": 4.0})
    entries = grid_claims(members)
    (test,) = [e for e in entries if e["comparison"] == "best round - teacher" and e["rule"] == "test"]
    (last,) = [e for e in entries if e["comparison"] == "best round - teacher" and e["rule"] == "last"]
    assert (test["verdict"], last["verdict"]) == (HOLDS, CONTRADICTED)
    assert test["rule_dependent"] and last["rule_dependent"]
    c2 = [e for e in entries if e["claim"] == "C2"]
    assert [e["verdict"] for e in c2] == [HOLDS, HOLDS] and not any(e["rule_dependent"] for e in c2)


def test_c3_slope_of_pll_advantage_over_eta():
    members = []
    for eta in (0.3, 0.5, 0.7, 0.9):
        members += chain(eta, {"0": 0.0, "1": 0.0, "p": 10.0 * eta})
    assert per_seed_slopes(members, "test") == pytest.approx([10.0] * 5, abs=2.0)
    (c3,) = [e for e in grid_claims(members) if e["claim"] == "C3" and e["rule"] == "test"]
    assert c3["verdict"] == HOLDS and c3["eta"] is None and c3["n"] == 5
    flat = []
    for eta in (0.3, 0.5):  # two rates: no slope claim
        flat += chain(eta, {"0": 0.0, "1": 0.0, "p": 0.0})
    assert not [e for e in grid_claims(flat) if e["claim"] == "C3"]


def test_no_noise_no_claim_of_help_under_noise():
    entries = grid_claims(chain(0.0, {"0": 0.0, "1": 1.0, "2": 0.0, "p": 0.0}))
    assert {e["claim"] for e in entries} == {"C4"}


def test_claim_files_or_one_line_without_enough_seeds(tmp_path, capsys):
    members = chain(0.5, {"0": 0.0, "1": 4.0, "p": 0.0})
    written = write_claims(members, tmp_path, "Synthetic", 1.0)
    assert sorted(p.name for p in written) == ["claims.json", "claims.md", "claims.pdf", "claims.png"]
    entries = json.loads((tmp_path / "claims.json").read_text())
    for entry in entries:
        assert {"dataset", "eta", "claim", "rule", "n", "mean", "ci", "verdict"} <= set(entry)
    md = (tmp_path / "claims.md").read_text()
    assert "## Verdicts that depend on the selection rule" in md and "| C1 | best round - teacher" in md
    two_seeds = [r for r in members if r["seed"] < 2]
    assert write_claims(two_seeds, tmp_path, "Synthetic", 1.0) == []
    assert "needs >= 3 seeds per cell, and this grid's cells have at most 2" in capsys.readouterr().out
    assert not (tmp_path / "claims.md").exists()  # a stale report would contradict the new tables


def test_the_forest_plot_subtitle_is_one_line_and_its_legend_explains_the_marks(tmp_path, monkeypatch):
    import utils.claims_report
    seen = {}
    real = utils.claims_report.save_figure

    def keep(plt, fig, stem):
        seen.update(title=fig.get_suptitle(),
                    legend=[text.get_text() for legend in fig.legends for text in legend.get_texts()])
        return real(plt, fig, stem)
    monkeypatch.setattr(utils.claims_report, "save_figure", keep)
    members = chain(0.5, {"0": 0.0, "1": 4.0, "p": 4.0}, last_offsets={"0": 0.0, "1": -4.0, "p": 4.0})
    write_claims(members, tmp_path, "Synthetic", 1.0)
    assert seen["title"] == ("A, resnet34, cc, lr 0.05, wd 0.0005: paired differences over seeds, mean and "
                             "95% t interval")
    assert seen["legend"] == ["best-by-test epoch (the paper's)", "last epoch", "C2's margin",
                              "(!) a verdict differs between rules"]


RECIPE = """\
name: tiny3
title: "Tiny digits grid, 3 seeds"
rounds: 2
grid:
  dataset: digits
  corruption: [0.3, 0.5, 0.7]
  manualSeed: [0, 1, 2]
  lr: 0.05
  wd: 5.0e-3
  epochs: 3
report: {kind: distillation, metric: test, gain_etas: [0.5], claims_margin: 2}
"""


def test_a_three_seed_grid_writes_claims_and_evidence(cli, tmp_path):
    recipe = tmp_path / "tiny3.yaml"
    recipe.write_text(RECIPE)
    assert cli("--config", recipe) == 0
    out = cli.dirs()["results"] / "reports" / "tiny3"
    entries = json.loads((out / "claims.json").read_text())
    assert {e["claim"] for e in entries} == {"C1", "C2", "C3", "C4"}
    assert {e["rule"] for e in entries} == {"test", "last"}
    assert all(e["margin"] == 2 for e in entries if e["claim"] == "C2")
    assert all(e["n"] == 3 for e in entries)
    evidence = json.loads((out / "evidence" / "digits" / "pixels" / "evidence.json").read_text())
    corrupted = [e for e in evidence["label_energy"] if e["labels"] == "corrupted"]
    assert [(e["eta"], e["seed"]) for e in corrupted] == [(0.3, 0), (0.5, 0), (0.7, 0)]
    # the evidence's corrupted labels are the runs' own: the same realised rate as the teacher of seed 0
    teachers = {r["eta"]: r for r in cli.records() if r["step"] == "0" and r["seed"] == 0}
    assert [e["realised_corruption"] for e in corrupted] == [teachers[e["eta"]]["realised_corruption"]
                                                              for e in corrupted]
    assert "| digits | pixels | 10 | 2 |" in (out / "evidence.md").read_text()
    assert (out / "correlation.png").exists() and (out / "claims.png").exists()
