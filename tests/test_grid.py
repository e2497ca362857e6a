"""Recipe grids end to end (`train_linear.py --config`): every job runs once, finished runs are
skipped, interrupted grids resume without losing or redoing runs, concurrent processes and shards
share one results store, bad recipes fail in one line, and a batched run equals the run alone.

All on a tiny digits recipe: 2 corruption rates x 2 seeds, teacher + 1 round + PLL, 3 epochs."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DIGITS, ROOT, Cli, stderr_error_lines
from test_engine import numbers
from data.datasets import digits_features
from utils.engine import FeatureSource
from utils.grid import matching_records, shard_jobs
from utils.runs import RunConfig, run_key

# `corruption: 0` is a YAML integer on purpose: it must name the same run as `--corruption 0`.
RECIPE = """\
name: tiny
title: "Tiny digits grid"
rounds: 1
partial: true
grid:
  dataset: digits
  corruption: [0, 0.5]
  manualSeed: [0, 1]
  lr: 0.05
  wd: 5.0e-3
  epochs: 3
report: {kind: distillation, metric: test, gain_etas: [0.0, 0.5]}
"""
STEPS = ("0", "1", "p")
CONFIGS = [RunConfig("digits", "pixels", eta=eta, seed=seed, lr=0.05, wd=5e-3, epochs=3)
           for eta in (0.0, 0.5) for seed in (0, 1)]


def expected_keys() -> set:
    fid = digits_features().fingerprint()
    return {run_key(cfg, step, fid) for cfg in CONFIGS for step in STEPS}


def write_recipe(folder, text=RECIPE, name="tiny.yaml"):
    path = folder / name
    path.write_text(text)
    return path


def record_files(cli, where) -> dict:
    """{file name: bytes} of the store's records."""
    return {p.name: p.read_bytes() for p in (cli.dirs(where)["results"] / "records").glob("*.json")}


def report_dir(cli, where):
    return cli.dirs(where)["results"] / "reports" / "tiny"


def runs_trained(spy_calls) -> int:
    return sum(call["data"].train_rows.shape[0] for call in spy_calls)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run once, uninterrupted, in one process: {key: record} and its tables.md."""
    folder = tmp_path_factory.mktemp("reference")
    cli = Cli(folder)
    assert cli("--config", write_recipe(folder), where="ref") == 0
    return {r["key"]: r for r in cli.records("ref")}, (report_dir(cli, "ref") / "tables.md").read_text()


def assert_same_as_reference(records, reference):
    by_key, _ = reference
    assert sorted(r["key"] for r in records) == sorted(by_key)
    for r in records:
        assert numbers(r) == numbers(by_key[r["key"]]), (r["key"], numbers(r), numbers(by_key[r["key"]]))


# ---- (a), (b): one command runs everything; the same command again runs nothing -------------------
def test_grid_runs_every_job_once_and_writes_reports(cli, spy, tmp_path, reference):
    assert cli("--config", write_recipe(tmp_path)) == 0
    records = cli.records()
    assert {r["key"] for r in records} == expected_keys() and len(records) == 12
    assert len(record_files(cli, "a")) == 12  # one file per (configuration, step)
    # one batched computation per step, all four configurations in it
    assert [call["data"].train_rows.shape[0] for call in spy.calls] == [4, 4, 4]
    assert {(r["eta"], r["seed"], r["step"]) for r in records} == {(c.eta, c.seed, s)
                                                                   for c in CONFIGS for s in STEPS}
    assert all(r["batch_runs"] == 4 and r["epochs"] == 3 for r in records)
    assert_same_as_reference(records, reference)

    out = report_dir(cli, "a")
    md, tex = (out / "tables.md").read_text(), (out / "tables.tex").read_text()
    assert md == reference[1]
    for row in ("1 (Teacher)", "| 2 |", "PLL", "eta = 0.0", "eta = 0.5", "n = 2 seeds"):
        assert row in md, row
    assert r"\begin{tabular}" in tex and "PLL" in tex
    for name in ("gain.png", "gain.pdf"):
        assert (out / name).stat().st_size > 1000
    assert len((out / "records.csv").read_text().splitlines()) == 1 + 12


def test_second_identical_command_trains_nothing(cli, spy, tmp_path):
    recipe = write_recipe(tmp_path)
    assert cli("--config", recipe) == 0
    before, calls = record_files(cli, "a"), len(spy.calls)
    stamps = {p: p.stat().st_mtime_ns for p in (cli.dirs()["results"] / "records").glob("*.json")}
    assert cli("--config", recipe) == 0
    assert cli("--config", recipe, "--report-only") == 0
    assert len(spy.calls) == calls  # train_heads was not called again
    assert record_files(cli, "a") == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_report_only_without_records_is_one_line(cli, tmp_path, capsys, no_training):
    assert cli("--config", write_recipe(tmp_path), "--report-only") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "without --report-only" in err


# ---- (c): interrupted grids resume -------------------------------------------------------------
def test_kill_between_chunks_resumes_without_redoing_or_losing_runs(cli, spy, tmp_path,
                                                                    monkeypatch, reference):
    """Two runs per batched computation: the process dies after the first chunk's records are written."""
    import utils.engine

    recipe = write_recipe(tmp_path)
    real = utils.engine.ChainRunner._job
    chunks = []

    def dies_before_second_chunk(self, *args, **kwargs):
        chunks.append(1)
        if len(chunks) == 2:
            raise KeyboardInterrupt  # as if killed between two batched computations
        return real(self, *args, **kwargs)
    monkeypatch.setattr(utils.engine.ChainRunner, "_job", dies_before_second_chunk)
    assert cli("--config", recipe, "--max-batch-runs", 2) == 130
    first = record_files(cli, "a")
    assert len(first) == 2 and len(spy.calls) == 1
    stamps = {name: (cli.dirs()["results"] / "records" / name).stat().st_mtime_ns for name in first}

    monkeypatch.setattr(utils.engine.ChainRunner, "_job", real)
    assert cli("--config", recipe, "--max-batch-runs", 2) == 0
    assert runs_trained(spy.calls[1:]) == 10  # the 10 unfinished runs, each once
    after = record_files(cli, "a")
    assert {k: after[k] for k in first} == first  # finished records untouched
    assert all((cli.dirs()["results"] / "records" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert_same_as_reference(cli.records(), reference)


def test_kill_inside_a_run_resumes_from_its_periodic_save(cli, spy, tmp_path, reference):
    recipe = write_recipe(tmp_path)

    def interrupt(state):
        if len(spy.calls) == 2 and state.epoch == 2:  # round 1, after the save of epoch 2
            raise KeyboardInterrupt
    spy.hook = interrupt
    assert cli("--config", recipe, "--save-every", 1) == 130
    teachers = record_files(cli, "a")
    assert len(teachers) == 4 and all(name.startswith("digits-0-") for name in teachers)
    partial = list(cli.dirs()["ckpt"].rglob("1-*/resume.pt"))
    assert len(partial) == 4

    spy.hook = None
    assert cli("--config", recipe, "--save-every", 1) == 0
    assert [(c["resume_epoch"], c["data"].train_rows.shape[0]) for c in spy.calls[2:]] == [(2, 4), (None, 4)]
    after = record_files(cli, "a")
    assert {k: after[k] for k in teachers} == teachers
    assert_same_as_reference(cli.records(), reference)


# ---- (d): two processes on one store ----------------------------------------------------------
def test_two_concurrent_processes_share_one_store(tmp_path, reference):
    cli = Cli(tmp_path)
    recipe = write_recipe(tmp_path)
    command = [sys.executable, "train_linear.py", "--config", str(recipe), "--save-every", "1",
               *cli.dir_args("shared")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert "Traceback" not in err
    folder = cli.dirs("shared")["results"] / "records"
    assert not [p.name for p in folder.iterdir() if not p.name.endswith(".json")]  # no temp files left
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]  # every file is whole JSON
    assert_same_as_reference(records, reference)
    assert (report_dir(cli, "shared") / "tables.md").read_text() == reference[1]
    assert len((report_dir(cli, "shared") / "records.csv").read_text().splitlines()) == 1 + 12


# ---- (e): shards ------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_partition_the_jobs_and_keep_a_shared_teacher_in_one_shard(count):
    from utils.engine import FeatureSource
    from utils.runs import RunConfig
    source = FeatureSource("digits")
    # the test and last chains of a seed share their teacher; a temperature does not change it either
    jobs = [(source, RunConfig("digits", "pixels", seed=seed, selection=sel, temperature=t))
            for seed in range(7) for sel in ("test", "last") for t in (1.0, 2.0)]
    shards = [shard_jobs(jobs, f"{i}/{count}") for i in range(count)]
    assert sorted(jobs.index(j) for s in shards for j in s) == list(range(len(jobs)))
    assert shard_jobs(jobs, f"0/{count}") == shards[0]  # deterministic
    for shard in shards:
        seeds = {cfg.seed for _, cfg in shard}
        assert len(shard) == 4 * len(seeds)  # all four chains of each of its seeds
    assert sorted(len(s) for s in shards)[-1] - sorted(len(s) for s in shards)[0] <= 4  # balanced


def test_two_shards_cover_the_grid_exactly_once(cli, spy, tmp_path, reference):
    recipe = write_recipe(tmp_path)
    assert cli("--config", recipe, "--shard", "0/2") == 0
    shard0 = {r["key"] for r in cli.records()}
    calls0 = len(spy.calls)
    assert runs_trained(spy.calls) == 6 and len(shard0) == 6
    assert {(r["eta"], r["seed"]) for r in cli.records()} in ({(0.0, 0), (0.5, 0)}, {(0.0, 1), (0.5, 1)},
                                                             {(0.0, 0), (0.0, 1)}, {(0.5, 0), (0.5, 1)})
    assert cli("--config", recipe, "--shard", "1/2") == 0
    assert runs_trained(spy.calls[calls0:]) == 6
    assert_same_as_reference(cli.records(), reference)
    # the last shard's report covers the whole grid, not only its own half
    assert (report_dir(cli, "a") / "tables.md").read_text() == reference[1]
    assert cli("--config", recipe) == 0  # and the whole grid has nothing left to train
    assert runs_trained(spy.calls) == 12


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3", "", "1/-2"])
def test_bad_shard_exits_2_with_one_line(cli, tmp_path, capsys, no_training, shard):
    assert cli("--config", write_recipe(tmp_path), "--shard", shard) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and len(stderr_error_lines(err)) == 1 and "--shard" in err


# ---- (f): bad recipes -------------------------------------------------------------------------
def _swap(old, new):
    assert old in RECIPE
    return RECIPE.replace(old, new)


BAD_RECIPES = {
    "malformed YAML": _swap("  corruption: [0, 0.5]", "  corruption: [0, 0.5"),
    "bad indentation": _swap("  manualSeed: [0, 1]", "   manualSeed: [0, 1]"),
    "empty file": "",
    "not a mapping": "- dataset: digits\n",
    "unknown top-level key": RECIPE + "epochs: 3\n",
    "unknown grid key": _swap("  lr: 0.05", "  lrate: 0.05"),
    "corruption is text": _swap("corruption: [0, 0.5]", 'corruption: "abc"'),
    "corruption list item is text": _swap("corruption: [0, 0.5]", "corruption: [0, abc]"),
    "epochs not an integer": _swap("epochs: 3", "epochs: 2.5"),
    "nested list": _swap("corruption: [0, 0.5]", "corruption: [[0, 0.5]]"),
    "empty list": _swap("manualSeed: [0, 1]", "manualSeed: []"),
    "selection not a choice": _swap("  epochs: 3", "  epochs: 3\n  selection: best"),
    "corruption out of range": _swap("corruption: [0, 0.5]", "corruption: [0, 1.5]"),
    "rounds is text": _swap("rounds: 1", "rounds: two"),
    "rounds is a boolean": _swap("rounds: 1", "rounds: true"),
    "partial is text": _swap("partial: true", "partial: maybe"),
    "name is a path": _swap("name: tiny", "name: ../../elsewhere"),
    "grid is a list": "name: tiny\ngrid: [digits]\n",
    "no grid": "name: tiny\n",
    "no dataset": _swap("  dataset: digits\n", ""),
    "per_dataset is a list": RECIPE + "per_dataset: [digits]\n",
    "per_dataset names a dataset not in the grid": RECIPE + "per_dataset:\n  cifar100: {lr: 0.1}\n",
    "per_dataset sets the dataset": RECIPE + "per_dataset:\n  digits: {dataset: cifar10}\n",
    "one setting under two names": _swap("  wd: 5.0e-3", "  wd: 5.0e-3\n  weight_decay: 1.0e-3"),
    "report is a list": _swap("report: {kind: distillation, metric: test, gain_etas: [0.0, 0.5]}",
                              "report: [test]"),
    "unknown report metric": _swap("metric: test", "metric: best"),
    "gain_etas not numbers": _swap("gain_etas: [0.0, 0.5]", "gain_etas: [low, high]"),
    "negative seed": _swap("manualSeed: [0, 1]", "manualSeed: [0, -1]"),
    "seed beyond 2**32": _swap("manualSeed: [0, 1]", "manualSeed: [0, 4294967296]"),
    "infinite temperature": _swap("  epochs: 3", "  epochs: 3\n  temperature: .inf"),
    "NaN learning rate": _swap("lr: 0.05", "lr: .nan"),
    "duplicate key": _swap("  lr: 0.05", "  lr: 0.05\n  lr: 0.1"),
    "duplicate top-level key": RECIPE + "rounds: 2\n",
    "dataset path with features": "name: tiny\ngrid:\n  features: f.npz\n  dataset: ../../x\n",
}


@pytest.mark.parametrize("text", list(BAD_RECIPES.values()), ids=list(BAD_RECIPES))
def test_bad_recipe_is_one_line_and_exit_2(cli, tmp_path, capsys, no_training, text):
    assert cli("--config", write_recipe(tmp_path, text)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "tiny.yaml" in lines[0]  # names the file to fix


def test_per_dataset_overrides_and_sweeps_only_its_dataset(tmp_path):
    from utils.grid import expand_grid, load_grid

    text = _swap("  dataset: digits", "  dataset: [digits, cifar100]") + (
        "per_dataset:\n  cifar100: {lr: [0.1, 0.2], weight-decay: 1.0e-4}\n")
    grid = load_grid(write_recipe(tmp_path, text))
    jobs = expand_grid(grid, lambda s: (s["dataset"], s["eta"], s["seed"], s["lr"], s["wd"]))
    assert len(jobs) == 4 + 8 and len(set(jobs)) == len(jobs)
    assert {(lr, wd) for d, *_, lr, wd in jobs if d == "digits"} == {(0.05, 5e-3)}
    assert {(lr, wd) for d, *_, lr, wd in jobs if d == "cifar100"} == {(0.1, 1e-4), (0.2, 1e-4)}
    assert all(type(j[1]) is float for j in jobs)  # `corruption: 0` read as --corruption reads it


def test_missing_recipe_file_is_one_line(cli, tmp_path, capsys, no_training):
    assert cli("--config", tmp_path / "nope.yaml") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not found" in err and "nope.yaml" in err


def test_run_flags_beside_config_are_refused_not_ignored(cli, tmp_path, capsys, no_training):
    assert cli("--config", write_recipe(tmp_path), "--epochs", 5, "--lr", 0.1) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--epochs" in err and "--lr" in err
    # named by the flags the user typed, not by the settings they fill (eta, seed)
    assert cli("--config", write_recipe(tmp_path), "--corruption", 0.3, "--manualSeed", 2) == 2
    assert "--corruption, --manualSeed cannot be combined with --config" in capsys.readouterr().err


def test_string_numbers_and_integers_in_recipes_become_the_flag_types(cli, tmp_path, spy, reference):
    """YAML reads an unquoted 5e-3 (no dot) as text and 0 as an integer; both must name the same runs
    (a quoted "5e-3" is text on purpose, and refused: tests/test_probe.py)."""
    text = _swap("wd: 5.0e-3", "wd: 5e-3")
    assert cli("--config", write_recipe(tmp_path, text)) == 0
    assert_same_as_reference(cli.records(), reference)


# ---- (g): a batched grid run equals the run alone ----------------------------------------------
def test_grid_run_equals_the_same_run_alone(cli, reference):
    assert cli(*DIGITS, "--corruption", 0, "--manualSeed", 1, "--epochs", 3, "--rounds", 1,
               where="alone") == 0
    alone = cli.by_step("alone")
    by_key, _ = reference
    assert set(alone) == set(STEPS)
    for step, rec in alone.items():
        assert rec["key"] in by_key, step  # the grid's `corruption: 0` is the same run as `--corruption 0`
        assert by_key[rec["key"]]["batch_runs"] == 4 and rec["batch_runs"] == 1
        assert numbers(rec) == numbers(by_key[rec["key"]]), step


def test_report_matches_records_by_backbone():
    """Two backbones with otherwise equal settings in one store: a grid reports only its own."""
    def rec(backbone, step):
        cfg = RunConfig("cifar100", backbone)
        return {"key": run_key(cfg, step, "f-" + backbone), "step": step, "created": "2025", **{
            name: getattr(cfg, name) for name in ("dataset", "backbone", "ctype", "eta", "seed", "lr", "wd",
                                                  "momentum",
                                                  "gamma", "epochs", "train_batch", "label_smoothing",
                                                  "val_split",
                                                  "val_clean", "temperature", "selection")}}
    store = [rec("resnet18", "0"), rec("resnet34", "0"), rec("resnet34", "p"), {"not": "a record"}]
    jobs = [(FeatureSource("cifar100", "resnet34"), RunConfig("cifar100", "resnet34"))]
    found = matching_records(store, jobs, ["0", "p"])
    assert [(r["backbone"], r["step"]) for r in found] == [("resnet34", "0"), ("resnet34", "p")]


# ---- (h): the bad values above, each with the message that names its fix ----------------------------
def the_error(cli, capsys, text, *needles, extra=(), names_file=True):
    assert cli("--config", write_recipe(cli.tmp, text), *extra) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not names_file or f"recipe file {cli.tmp / 'tiny.yaml'}" in lines[0] or \
        f"recipe {cli.tmp / 'tiny.yaml'}:" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_recipe_seed_out_of_range_names_the_range(cli, capsys, no_training, seed):
    the_error(cli, capsys, _swap("manualSeed: [0, 1]", f"manualSeed: [0, {seed}]"),
              f"manualSeed={seed}",
              f"--manualSeed must be an integer in [0, 4294967295] (0 <= seed < 2**32), got {seed}")


def test_recipe_with_a_key_given_twice_is_refused(cli, capsys, no_training):
    """Plain YAML would keep the last `lr:` silently and run only one of the two learning rates."""
    line = the_error(cli, capsys, _swap("  lr: 0.05", "  lr: 0.05\n  lr: 0.1"),
                     "key 'lr' is given twice", "keep one")
    assert "line 10" in line  # the second `lr:`


def test_recipe_dataset_name_with_features_must_be_plain(cli, capsys, no_training, tmp_path):
    from conftest import blob_features
    import numpy as np
    np.savez(tmp_path / "f.npz", **blob_features())
    text = f"name: tiny\ngrid:\n  features: {tmp_path / 'f.npz'}\n  dataset: [ok, ../../x]\n  epochs: 1\n"
    the_error(cli, capsys, text, "-d '../../x' is not a plain name")
    assert not cli.dirs()["results"].exists() and not cli.dirs()["ckpt"].exists()


def big_recipe(seeds, epochs):
    return (f"name: tiny\ngrid:\n  dataset: digits\n  manualSeed: {list(range(seeds))}\n"
            f"  epochs: {list(range(1, epochs + 1))}\n")


def test_huge_grid_is_refused_quickly_with_its_count(cli, capsys, no_training):
    import time
    started = time.time()
    the_error(cli, capsys, big_recipe(1000, 1000), "its grid has 1,000,000 chains", "more than 100,000",
              "--allow-large-grid")
    assert time.time() - started < 10  # counted, not expanded


def test_allow_large_grid_lifts_the_bound(cli, capsys, no_training, tmp_path, monkeypatch):
    import utils.grid
    monkeypatch.setattr(utils.grid, "MAX_CHAINS", 3)
    the_error(cli, capsys, RECIPE, "its grid has 4 chains", "more than 3", "--allow-large-grid")
    # past the bound: the grid expands, and --report-only then finds nothing to report
    the_error(cli, capsys, RECIPE, "no results yet for recipe tiny",
              extra=("--allow-large-grid", "--report-only"),
              names_file=False)


def test_grid_exactly_at_the_bound_is_accepted(tmp_path):
    from utils.grid import MAX_CHAINS, count_chains, load_grid
    assert count_chains(load_grid(write_recipe(tmp_path, big_recipe(100, MAX_CHAINS // 100)))) == MAX_CHAINS


def test_chain_count_equals_what_expansion_iterates(tmp_path):
    from itertools import count
    from utils.grid import count_chains, expand_grid, load_grid

    text = _swap("  dataset: digits", "  dataset: [digits, cifar100, cifar10]") + (
        "per_dataset:\n  cifar100: {lr: [0.1, 0.2, 0.3], weight-decay: [1.0e-4, 2.0e-4]}\n"
        "  cifar10: {lr: 0.1}\n")
    grid = load_grid(write_recipe(tmp_path, text))
    counter = count()
    jobs = expand_grid(grid, lambda settings: next(counter))  # every iteration is a distinct job
    assert count_chains(grid) == len(jobs) == 4 * (1 + 6 + 1)
    import yaml
    assert count_chains(yaml.safe_load(text)) == len(jobs)  # the raw recipe counts the same


# ---- what a grid command prints -------------------------------------------------------------------
def test_grid_summaries_count_distinct_runs_and_finished_ones(cli, tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert cli("--config", recipe, "--shard", "0/2") == 0
    out = capsys.readouterr().out
    # the plan first: runs per step and epochs (the recipe: 3 epochs)
    assert ("recipe tiny: shard 0/2: 2 of 4 configurations x 3 steps: 6 runs on cpu "
            "(2 per step, 3 epochs each)\n") in out
    assert "this process trained 6 runs\n" in out
    assert "12 runs, of which 6 not finished yet -> " in out
    assert out.count("superclasses of digits (cc): {") == 1  # once, for every eta and seed of the dataset
    assert cli("--config", recipe) == 0
    out = capsys.readouterr().out
    records = cli.dirs()["results"] / "records"
    assert (f"this process trained 6 runs; 6 runs already finished (records in {records}/); "
            "--overwrite retrains\n") in out
    assert "12 runs, all finished -> " in out


def test_grid_summaries_name_teachers_shared_by_several_chains(cli, tmp_path, capsys):
    text = RECIPE.replace("corruption: [0, 0.5]", "corruption: 0.5")
    text = text.replace("manualSeed: [0, 1]", "temperature: [1, 2]")
    recipe = write_recipe(tmp_path, text.replace("partial: true", "partial: false"), name="temps.yaml")
    assert cli("--config", recipe) == 0
    out = capsys.readouterr().out
    assert ("2 configurations x 2 steps: 3 runs (1 teacher shared by several chains) on cpu "
            "(per step: 1 (Teacher) 1, 2 2; 3 epochs each)\n") in out
    assert "3 runs (1 teacher shared by several chains), all finished -> " in out
    recipe = write_recipe(tmp_path, text, name="temps_pll.yaml")
    assert cli("--config", recipe) == 0
    out = capsys.readouterr().out
    assert "4 runs (1 teacher and 1 PLL student shared by several chains), all finished -> " in out
    assert "this process trained 1 run; 3 runs already finished" in out  # the PLL student is new


def test_one_configuration_is_one_configuration(cli, tmp_path, capsys):
    text = RECIPE.replace("corruption: [0, 0.5]", "corruption: 0.5")
    assert cli("--config", write_recipe(tmp_path, text.replace("manualSeed: [0, 1]", "manualSeed: 0"))) == 0
    out = capsys.readouterr().out
    assert "recipe tiny: 1 configuration x 3 steps: 3 runs on cpu (1 per step, 3 epochs each)\n" in out
    assert "this process trained 3 runs\n" in out


def test_a_features_key_naming_no_file_is_reported_as_the_recipe_names_it(cli, tmp_path, capsys, no_training,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = RECIPE.replace("  dataset: digits\n", "  features: nosuch.npz\n")
    assert cli("--config", write_recipe(tmp_path, text)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: recipe {tmp_path / 'tiny.yaml'}: features: nosuch.npz is not a file (a relative "
                   f"path is read from {tmp_path}); point the recipe's features: key at a .pt/.npz features "
                   "file (README, 'Features-file format')\n")
