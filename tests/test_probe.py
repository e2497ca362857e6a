"""A probe of bad values and damaged stores, derived from the declarations so it covers what is added
later: every numeric option of both commands at 0, -1, huge, NaN, inf and as text, every sweepable
option quoted in a recipe, every field of a real record given a wrong type, and the cases issue 23
found (a teacher checkpoint that is a foreign pickle, stray or copied records, a lease beside a
finished teacher). A refusal is one line and exit 2; an accepted value is what its declaration
allows; nothing ends in a traceback."""
import json
import math
import pickle
import shutil

import pytest

import numerical_solving
import train_linear
from conftest import DIGITS, stderr_error_lines
from utils.cli import UserError, run_main
from utils.options import Interval
from utils.runs import SETTINGS, read_record, record_problem
from utils.settings import GRID_KEYS, OPTIONS

PROBE_VALUES = ["0", "-1", str(10 ** 30), "nan", "inf", "-inf", "abc", "1.5"]


class Accepted(Exception):
    """Raised where the command would start its work: every check has passed."""


def expected_accepted(opt, text: str) -> bool:
    """What the declaration allows for `text` typed after the option's flag."""
    try:
        value = opt.type(text)
    except ValueError:
        return False
    if opt.type is float and not math.isfinite(value):
        return False
    if opt.choices is not None and value not in opt.choices:
        return False
    return opt.valid is None or opt.valid(value)


def numeric(options):
    return [opt for opt in options if opt.type in (int, float) and opt.flags]


@pytest.fixture
def stopped_before_work(monkeypatch):
    """train_linear.py with its work replaced by `Accepted`: the probe sees only the checks."""
    class Runner:
        def __init__(self, opts):
            pass

        def run(self, jobs, steps):
            raise Accepted
    import utils.engine  # train_linear.py imports it once the command line is checked
    monkeypatch.setattr(utils.engine, "ChainRunner", Runner)


@pytest.mark.parametrize("opt", numeric(OPTIONS), ids=lambda o: o.flag)
def test_every_numeric_option_of_train_linear(opt, stopped_before_work, capsys, tmp_path):
    for text in PROBE_VALUES:
        argv = [*DIGITS, "--results", str(tmp_path), "--checkpoint", str(tmp_path), opt.flags[-1], text]
        try:
            rc = run_main(train_linear.main, argv)
        except Accepted:
            rc = 0
        err = capsys.readouterr().err
        allowed = expected_accepted(opt, text)
        if opt.dest == "depth":  # --depth is checked against the ResNet depths, not an interval
            allowed = text in ("18", "34", "50")
        assert (rc == 0) == allowed, (opt.flag, text, err)
        if rc:
            assert rc == 2 and len(stderr_error_lines(err)) == 1 and "Traceback" not in err, (opt.flag, text)


def test_options_that_scale_the_work_are_bounded():
    """A typo such as --epochs 1000000000000 is refused at once rather than run for days."""
    by_dest = {opt.dest: opt for opt in OPTIONS}
    for dest in ("epochs", "rounds", "dist"):
        assert isinstance(by_dest[dest].valid, Interval) and math.isfinite(by_dest[dest].valid.high), dest


@pytest.mark.parametrize("opt", numeric([*numerical_solving.RUN_OPTIONS.values(),
                                         *numerical_solving.th.SETTING_OPTIONS.values()]),
                         ids=lambda o: o.flag)
def test_every_numeric_option_of_numerical_solving(opt, monkeypatch, capsys, tmp_path):
    def stop(*args, **kwargs):
        raise Accepted
    monkeypatch.setattr(numerical_solving, "solve_all", stop)
    for text in PROBE_VALUES:
        try:
            rc = run_main(numerical_solving.main, ["--out", str(tmp_path), opt.flags[-1], text])
        except Accepted:
            rc = 0
        err = capsys.readouterr().err
        if rc:
            assert rc == 2 and len(stderr_error_lines(err)) == 1 and "Traceback" not in err, (opt.flag, text)
        elif opt.dest != "threads":  # --threads is also capped at the cores (below)
            assert expected_accepted(opt, text), (opt.flag, text)


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "100000"], "give at most"),
    (["--sweep", "eta=0.1", "--sweep", "eta=0.2"], "--sweep eta is given twice"),
    (["--sweep", "seed=" + ",".join(map(str, range(3000))), "--sweep", "eta=0.1,0.2,0.3,0.4"],
     "12,000 settings (3000 seed x 4 eta), more than 10,000"),
])
def test_theory_commands_that_could_not_run_are_refused(argv, needle, capsys, tmp_path):
    assert run_main(numerical_solving.main, ["--out", str(tmp_path), *argv]) == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and needle in lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--rounds", "2", "--dist", "1"], "drop --dist"),
    (["--rounds", "2", "--partial"], "drop --partial"),
    (["--gpu-id", "abc"], "--gpu-id 'abc'"),
    (["-j", "-1"], "--workers must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
])
def test_flags_that_used_to_be_ignored_or_accepted(argv, needle, cli, capsys, no_training):
    assert cli(*DIGITS, *argv) == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and needle in lines[0]


@pytest.mark.parametrize("key", sorted(k for k, dest in GRID_KEYS.items()
                                       if dest in SETTINGS and SETTINGS[dest].type in (int, float)))
def test_a_quoted_number_in_a_recipe_is_refused(key, cli, tmp_path, capsys, no_training):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'name: r\ngrid:\n  dataset: digits\n  {key}: "1"\n')
    assert cli("--config", recipe) == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"'grid.{key}': '1' is quoted" in lines[0]


# ---- the results store ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A store with a teacher and a round-1 student of digits (2 epochs): (folder, argv)."""
    from conftest import Cli
    cli = Cli(tmp_path_factory.mktemp("store"))
    assert cli(*DIGITS, "--epochs", "2", "--dist", "0") == 0
    assert cli(*DIGITS, "--epochs", "2", "--dist", "1") == 0
    return cli


@pytest.fixture
def store(finished, tmp_path):
    from conftest import Cli
    cli = Cli(tmp_path)
    shutil.copytree(finished.tmp / "a", tmp_path / "a")
    return cli


def student_record_path(cli):
    return next(p for p in (cli.dirs()["results"] / "records").glob("digits-1-*.json"))


def test_every_record_field_is_checked(store):
    path = student_record_path(store)
    record = json.loads(path.read_text())
    assert record_problem(record, path.stem) is None
    for field in record:
        # no field takes all three: a list, a mapping and a negative number
        problems = [record_problem({**record, field: wrong}, path.stem) for wrong in ([], {}, -7)]
        assert any(problems), field
        assert all("\n" not in p for p in problems if p)


@pytest.mark.parametrize("field, value", [("test_acc_bytest", "abc"), ("test_acc_bytest", None),
                                          ("test_acc_bytest", float("nan")), ("step", "zz"), ("eta", "0.5"),
                                          ("seed", None), ("epoch_last", 0)])
def test_a_wrong_typed_record_stops_chain_and_report_in_one_line(store, capsys, field, value, tmp_path):
    path = student_record_path(store)
    record = json.loads(path.read_text())
    if value is None and field == "seed":
        del record["seed"]
    else:
        record[field] = value
    path.write_text(json.dumps(record))
    assert store(*DIGITS, "--epochs", "2", "--dist", "1") == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"damaged result record {path}" in lines[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nrounds: 1\npartial: false\ngrid: {dataset: digits, lr: 0.05, wd: 5.0e-3, "
                      "epochs: 2}\n")
    assert store("--config", recipe, "--report-only") == 2
    assert f"damaged result record {path}" in stderr_error_lines(capsys.readouterr().err)[0]


def test_a_record_copied_under_another_runs_name_is_refused(store, capsys):
    student = student_record_path(store)
    teacher = next(p for p in student.parent.glob("digits-0-*.json"))
    record = json.loads(teacher.read_text())
    record["key"] = student.stem
    student.write_text(json.dumps(record))
    with pytest.raises(UserError, match="another run's name"):
        read_record(student)


def test_a_stray_json_file_in_the_store_is_named(store, capsys):
    (store.dirs()["results"] / "records" / "zzz.json").write_text("{}")
    assert store(*DIGITS, "--epochs", "2", "--dist", "1") == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "zzz.json is not a result record of this tool" in lines[0]


def test_a_foreign_pickle_as_teacher_is_one_line_naming_the_file_and_the_command(store, capsys):
    """The hash in the teacher's record is updated to match, so only loading can tell."""
    import hashlib

    teacher_record = next((store.dirs()["results"] / "records").glob("digits-0-*.json"))
    record = json.loads(teacher_record.read_text())
    best = store.run_folder(record) / "best.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))
    best.write_bytes(pickle.dumps(Payload()))
    record["checkpoints"]["best"]["sha256"] = hashlib.sha256(best.read_bytes()).hexdigest()
    teacher_record.write_text(json.dumps(record))
    assert store(*DIGITS, "--epochs", "2", "--dist", "1", "--overwrite") == 2
    out, err = capsys.readouterr()
    assert "payload ran" not in out + err
    lines = stderr_error_lines(err)
    assert len(lines) == 1 and f"checkpoint {best}" in lines[0] and "--dist 0 --overwrite" in lines[0]


def test_a_damaged_lease_beside_a_finished_teacher_is_removed_by_its_students(store):
    import os
    import time

    teacher_record = next((store.dirs()["results"] / "records").glob("digits-0-*.json"))
    lease = store.run_folder(json.loads(teacher_record.read_text())) / "lease.json"
    lease.write_text("{not json")
    old = time.time() - 3600
    os.utime(lease, (old, old))
    assert store(*DIGITS, "--epochs", "2", "--dist", "1", "--overwrite") == 0
    assert not lease.exists()


def test_a_cell_with_fewer_seeds_than_the_grid_says_so(cli, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nrounds: 0\npartial: false\ngrid: {dataset: digits, lr: 0.05, wd: 5.0e-3, "
                      "epochs: 2, manualSeed: [0, 1]}\n")
    assert cli("--config", recipe) == 0
    for path in (cli.dirs()["results"] / "records").glob("*.json"):
        if json.loads(path.read_text())["seed"] == 1:
            path.unlink()
    assert cli("--config", recipe, "--report-only") == 0
    table = (cli.dirs()["results"] / "reports" / "r" / "tables.md").read_text()
    assert "(n=1)" in table and "over n = 2 seeds" in table
