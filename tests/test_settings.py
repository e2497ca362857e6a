"""Each setting is declared once (utils/runs.py, utils/engine.py, utils/settings.py); every place
derived from the declarations covers every setting, a setting that changes a step's numbers enters
that step's run key, and no module imports another in a cycle."""
import ast
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from conftest import ROOT, blob_features

from utils.engine import ChainRunner, EngineOptions, FeatureSource
from utils.options import Interval
from utils.report import CSV_FIRST
from utils.runs import SETTING_COLUMNS, SETTINGS, RunConfig, run_key, step_fields, step_settings
from utils.settings import ENGINE_OPTIONS, GRID_KEYS, OPTIONS, RUN_OPTIONS, build_parser
from utils.steps import Step

STEPS = {"teacher": Step.teacher(), "student": Step.student(1), "pll": Step.pll()}
# A value other than the base's for each run setting: a new setting must be given one here, so the
# test below checks that it enters the key of every step whose numbers it changes.
OTHER_VALUE = {"dataset": None, "backbone": None,  # names only: they enter every key (checked below)
               "ctype": "asym", "eta": 0.5, "seed": 1, "lr": 0.3, "wd": 3e-2, "momentum": 0.5, "gamma": 0.7,
               "epochs": 5, "train_batch": 16, "label_smoothing": 0.3, "val_split": 0.3, "val_clean": True,
               "feature_norm": "l2", "temperature": 4.0, "selection": "last"}
BASE = RunConfig("blobs", "file", ctype="sym", eta=0.3, seed=0, lr=0.1, wd=1e-3, epochs=4, train_batch=32,
                 val_split=0.2)


def test_every_run_setting_reaches_every_place_derived_from_it():
    parser = {a.dest: a for a in build_parser()._actions}
    assert set(SETTINGS) == {f.name for f in fields(RunConfig)}
    for name, opt in SETTINGS.items():
        assert opt.help, name
        if opt.flags:
            assert set(parser[name].option_strings) == set(opt.flags), name
            assert parser[name].default == opt.default, name
            assert opt.help in parser[name].help, name
        if opt.sweep:
            assert opt.grid_names and all(GRID_KEYS[key] == name for key in opt.grid_names), name
            assert name in RUN_OPTIONS, name
        for kind, step in STEPS.items():
            assert (name in step_fields(step)) == (kind in opt.steps), (name, kind)
            if kind in opt.steps and not opt.is_neutral(getattr(BASE, name)):
                assert name in step_settings(BASE, step, "f"), (name, kind)  # so in the key and the record
        if opt.column:
            assert name in SETTING_COLUMNS and name in CSV_FIRST, name
    assert {"dataset", "backbone"} <= set(step_fields(Step.teacher()))


def test_every_option_is_on_the_command_line_once_with_its_help_and_default():
    parser = build_parser()
    dests = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(dests) == len(set(dests))
    assert set(dests) == {opt.dest for opt in OPTIONS if opt.flags}
    for opt in ENGINE_OPTIONS.values():
        assert getattr(EngineOptions(), opt.dest) == opt.default, opt.dest


@pytest.mark.parametrize("name", sorted(n for n, opt in SETTINGS.items() if opt.valid or opt.choices))
def test_each_constraint_refuses_a_bad_value(name):
    """Each declared constraint is applied (by check_settings, which every command line and recipe
    goes through) with a message naming the option."""
    from utils.cli import UserError
    from utils.runs import check_settings

    opt = SETTINGS[name]
    bad = "nosuch" if opt.choices else -1
    with pytest.raises(UserError, match=opt.flag):
        check_settings(replace(BASE, **{name: bad}))


def _numbers_of_each_step(tmp_path, cfg, features_path) -> dict:
    """{step kind: (record numbers, last weights)} of a teacher -> round 1 -> PLL chain in fresh folders."""
    opts = EngineOptions(checkpoint_root=str(tmp_path / "ckpt"), results_root=str(tmp_path / "results"),
                         progress="none")
    records = ChainRunner(opts).run([(FeatureSource(cfg.dataset, features_path=str(features_path)), cfg)],
                                    list(STEPS.values()))
    out = {}
    for kind, rec in zip(STEPS, records):
        numbers = {k: v for k, v in rec.items() if k.startswith(("test_", "val_acc", "best_train", "epoch_"))}
        folder = next((tmp_path / "ckpt").rglob(f"{rec['step']}-{rec['key'].rsplit('-', 1)[1]}"))
        out[kind] = (numbers, torch.load(folder / "last.pt", weights_only=True)["model"]["weight"])
    return out


def _same(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


def test_a_setting_that_changes_a_steps_numbers_enters_that_steps_key(tmp_path):
    """Train the base chain and, for each setting, the chain with that setting changed: wherever a
    step's numbers differ, its run key must differ too (else a stale result would be reused)."""
    assert set(OTHER_VALUE) == set(SETTINGS), "give every new setting a value in OTHER_VALUE"
    path = tmp_path / "blobs.npz"
    np.savez(path, **blob_features(num_train=240, num_test=60, dim=6, num_classes=4, seed=3))
    base = _numbers_of_each_step(tmp_path / "base", BASE, path)
    changed_any = set()
    for name, value in OTHER_VALUE.items():
        if value is None:
            continue
        cfg = replace(BASE, **{name: value})
        numbers = _numbers_of_each_step(tmp_path / name, cfg, path)
        for kind, step in STEPS.items():
            if not _same(numbers[kind], base[kind]):
                changed_any.add(name)
                assert run_key(cfg, step, "f") != run_key(BASE, step, "f"), \
                    f"{name} changes the numbers of the {kind} step but not its run key"
    assert changed_any == {n for n, v in OTHER_VALUE.items() if v is not None}, \
        "an OTHER_VALUE changes nothing"


def _project_modules() -> dict:
    """{module name: file} of the project's own Python modules (tests and benches aside)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("utils/*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("models/*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _imports(path, modules) -> set:
    """The project modules a file imports anywhere in it (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_no_module_imports_another_in_a_cycle():
    modules = _project_modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert "train_linear" not in set().union(*graph.values())


# The layers of the training side (README, "Layout"): only these import the training loop.
SCIENCE = {"utils.chain", "utils.train", "utils.losses"}
PERSISTENCE = {"utils.engine", "utils.checkpoints", "utils.labels"}
# Modules that describe runs and results: they must not reach the loop even through another module.
DESCRIPTIONS = {"utils.runs", "utils.steps", "utils.selection", "utils.report", "utils.options",
                "utils.threads", "utils.io", "utils.cli", "utils.leases", "utils.progress", "utils.evidence",
                "utils.evidence_report", "utils.claims", "utils.claims_report"}


def test_no_module_imports_the_training_loop_but_the_science_and_persistence_layers():
    modules = _project_modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    direct = {name for name, imported in graph.items() if "utils.train" in imported}
    assert direct <= SCIENCE | PERSISTENCE, direct - SCIENCE - PERSISTENCE

    def reaches(name, seen=()):
        return name == "utils.train" or any(reaches(o, seen + (name,)) for o in graph[name] if o not in seen)
    described = DESCRIPTIONS | {name for name in modules if name.startswith(("data.", "models."))}
    assert not [name for name in sorted(described) if reaches(name)]


@pytest.mark.parametrize("interval, inside, outside, words", [
    (Interval(float, 0, 1), [0, 0.5, 1], [-0.1, 1.1, float("nan")], "lie in [0, 1]"),
    (Interval(float, 0, 1, closed="left"), [0, 0.99], [1], "lie in [0, 1)"),
    (Interval(float, 0, 1, closed="right"), [1e-9, 1], [0], "lie in (0, 1]"),
    (Interval(float, 0, closed="neither"), [1e-30, 1e30], [0, -1, float("inf")], "be > 0"),
    (Interval(int, 1, note="Adam steps"), [1, 10**9], [0, 1.5, True], "be >= 1 (Adam steps)"),
    (Interval(int, 0, 2**32 - 1), [0, 2**32 - 1], [-1, 2**32], "be an integer in [0, 4294967295]"),
    (Interval(float, 0, 0.5, closed="right", also=(0,)), [0, 0.5], [0.6, -0.1], "lie in (0, 0.5] or be 0"),
])
def test_a_constraint_words_its_own_message(interval, inside, outside, words):
    assert all(interval(x) for x in inside) and not any(interval(x) for x in outside)
    assert interval.describe() == words
