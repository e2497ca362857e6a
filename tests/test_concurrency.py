"""Many processes, shards and restarts on one store: leases, final checkpoints apart from resumable
state, records written last, teachers read through their records, and bit-identical numbers.

The end-to-end tests start real processes (and kill some with SIGKILL at random moments) on a
digits grid whose `last`-selection and `test`-selection chains share their teachers, with a
validation split and a periodic save every epoch: the scenario in which stores used to end up
with records trained from half-finished teachers. The full-size scenario (4 processes, 3 shards,
10 kills) is marked slow: `python -m pytest -m slow tests`."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_linear
from conftest import DIGITS, ROOT, Cli, stderr_error_lines
from utils.cli import UserError, run_main
from utils.io import HOST, atomic_write_bytes, remove_stale_temporaries
from utils.leases import LEASE_NAME, LeaseLost, read_holder, try_claim
from utils.runs import VOLATILE_FIELDS, ResultsStore

RECIPE = """\
name: busy
rounds: 1
grid:
  dataset: digits
  corruption: [0.0, 0.5]
  manualSeed: [0, 1]
  lr: 0.05
  wd: 5.0e-3
  epochs: {epochs}
  val_split: 0.1
  selection: [test, last]
report: {{kind: distillation, metric: selected, gain_etas: [0.5]}}
"""
RUNS = 4 + 8 + 8  # 4 teachers shared by the test and last chains, 8 round-1 students, 8 PLL students
# The issue's scenario: 3 rates x 3 seeds x 2 rules, 3 rounds, 100 epochs; 9 teachers shared by 2 chains each
ISSUE_RECIPE = RECIPE.replace("rounds: 1", "rounds: 3").replace("[0.0, 0.5]", "[0.0, 0.5, 0.9]").replace(
    "[0, 1]", "[0, 1, 2]")
ISSUE_RUNS = 9 + 18 * 4


def numbers_of(records) -> dict:
    """key -> the record without the fields that say which process made it, or when."""
    return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in records}


def store_numbers(folder: Path) -> dict:
    return numbers_of(ResultsStore(folder).records())


def tables(folder: Path) -> str:
    return (folder / "reports" / "busy" / "tables.md").read_text()


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """(recipe path for `epochs`, reference numbers and tables of one uninterrupted process)."""
    made = {}

    def get(epochs, text=RECIPE, runs=RUNS):
        if (epochs, text) not in made:
            base = tmp_path_factory.mktemp(f"busy{epochs}")
            recipe = base / "busy.yaml"
            recipe.write_text(text.format(epochs=epochs))
            cli = Cli(base)
            assert cli("--config", recipe, "--save-every", 1) == 0
            results = cli.dirs()["results"]
            made[epochs, text] = (recipe, store_numbers(results), tables(results))
            assert len(made[epochs, text][1]) == runs
        return made[epochs, text]
    return get


def start(recipe, store: Path, *extra, save_every=1):
    args = [sys.executable, "train_linear.py", "--config", str(recipe), "--save-every", str(save_every),
            "--checkpoint", str(store / "ckpt"), "--results", str(store / "results"),
            "--cache-dir", str(store / "cache"), "--data-root", str(store / "data"),
            "--lease-timeout", "20", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs) -> list:
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    return [out for out, _ in outputs]


def trained_counts(outputs) -> list:
    return [int(line.split("trained ")[1].split(" ")[0]) for out in outputs for line in out.splitlines()
            if line.startswith("this process trained")]


def kill_mid_grid(procs, store: Path, rng, within=1.0):
    """SIGKILL, at a random moment (up to `within` s) after it began to train a chunk of runs (it
    holds a lease), the first of `procs` that trains, so the kill lands in an epoch, a periodic save
    or the final writes. Returns the killed process."""
    def trainer():
        for lease in store.glob("ckpt/**/" + LEASE_NAME):
            holder = read_holder(lease)
            for proc in procs:
                if holder is not None and holder.pid == proc.pid:
                    return proc
        return None
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline and any(p.poll() is None for p in procs):
        victim = trainer()
        time.sleep(0.01)
    time.sleep(rng.random() * within)
    assert victim is not None and victim.poll() is None, "nothing was killed: give the grid more epochs"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    return victim


def assert_store_is_clean(store: Path):
    leftovers = [p for p in store.rglob("*")
                 if p.name.endswith(".tmp") or p.name in (LEASE_NAME, "resume.pt")]
    assert leftovers == []


def assert_same_as_one_process(store: Path, reference):
    _, numbers, table = reference
    assert store_numbers(store / "results") == numbers
    assert tables(store / "results") == table
    assert_store_is_clean(store)


# ---- leases ----------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(folder: Path, pid: int, heartbeat: float, host=HOST, token="old"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_NAME).write_text(json.dumps({"host": host, "pid": pid, "token": token,
                                                 "started": heartbeat,
                                                 "heartbeat": heartbeat}))


def test_a_lease_is_held_until_released(tmp_path):
    lease, holder = try_claim(tmp_path, stale_after=60)
    assert lease is not None and holder is None
    again, holder = try_claim(tmp_path, stale_after=60)
    assert again is None and holder.pid == os.getpid() and holder.token == lease.token
    lease.heartbeat()
    assert read_holder(tmp_path / LEASE_NAME).heartbeat >= lease.started
    lease.release()
    assert not (tmp_path / LEASE_NAME).exists()
    assert try_claim(tmp_path, stale_after=60)[0] is not None


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    write_lease(tmp_path, dead_pid(), time.time())
    lease, _ = try_claim(tmp_path, stale_after=3600)
    assert lease is not None and read_holder(tmp_path / LEASE_NAME).token == lease.token


def test_a_live_holder_elsewhere_is_left_alone_until_its_heartbeat_is_stale(tmp_path):
    write_lease(tmp_path, 1, time.time() - 30, host="other-node")
    lease, holder = try_claim(tmp_path, stale_after=60)
    assert lease is None and holder.describe() == "other-node:1"
    lease, _ = try_claim(tmp_path, stale_after=10)  # the same lease judged with a shorter limit
    assert lease is not None


@pytest.mark.parametrize("heartbeat", [float("nan"), float("inf"), time.time() + 1e6, "soon"],
                         ids=["nan", "inf", "far future", "text"])
def test_a_heartbeat_that_cannot_be_right_goes_stale_by_the_file_age(tmp_path, heartbeat):
    """Judged by the lease file's modification time: left alone while the file is fresh, taken over
    once it is older than the timeout (it used to be held forever)."""
    write_lease(tmp_path, 1, heartbeat, host="other-node")
    assert try_claim(tmp_path, stale_after=60) == (None, read_holder(tmp_path / LEASE_NAME))
    old = time.time() - 120
    os.utime(tmp_path / LEASE_NAME, (old, old))
    lease, _ = try_claim(tmp_path, stale_after=60)
    assert lease is not None


def test_a_holder_whose_lease_was_taken_over_learns_it_at_its_next_heartbeat(tmp_path):
    lease, _ = try_claim(tmp_path, stale_after=60)
    write_lease(tmp_path, 1, time.time(), host="other-node", token="new")  # what a takeover leaves
    with pytest.raises(LeaseLost):
        lease.heartbeat()
    lease.release()  # not ours any more: left in place
    assert read_holder(tmp_path / LEASE_NAME).token == "new"


CLAIMER = """
import sys, time
sys.path.insert(0, {root!r})
from utils.leases import try_claim
while time.time() < {at}:
    pass
lease, _ = try_claim({folder!r}, stale_after=600)
print("won" if lease else "lost")
"""


def test_processes_claiming_at_the_same_moment_get_one_lease(tmp_path):
    for trial in range(2):
        folder = tmp_path / str(trial)
        at = time.time() + 6  # after every process's imports: they claim within microseconds of each other
        code = CLAIMER.format(root=str(ROOT), at=at, folder=str(folder))
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
        results = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(results) == ["lost"] * 3 + ["won"]


# ---- atomic files and leftovers ----------------------------------------------------------------
def test_a_writer_failing_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes were written, before they count
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # its temporary file is gone too


KILLED_WRITER = """
import sys
sys.path.insert(0, {root!r})
from utils.io import atomic_write_bytes
i = 0
while True:
    i += 1
    atomic_write_bytes({target!r}, bytes([i % 251]) * 4_000_000)
"""


def test_a_writer_killed_at_random_moments_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "big.bin"
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c",
                                 KILLED_WRITER.format(root=str(ROOT), target=str(target))])
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:  # start-up (imports) takes a while
            time.sleep(0.05)
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == 4_000_000 and data == data[:1] * len(data)
    remove_stale_temporaries(tmp_path)  # the temporary file of a writer killed mid-write, if any
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_leftover_temporaries_of_live_writers_and_other_hosts_are_kept(tmp_path):
    mine_dead = tmp_path / f".r.json.{HOST}.{dead_pid()}.x1.tmp"
    mine_live = tmp_path / f".r.json.{HOST}.{os.getpid()}.x2.tmp"
    other = tmp_path / ".r.json.other.host.with.dots.12.x3.tmp"
    old_other = tmp_path / ".r.json.other.12.x4.tmp"
    for path in (mine_dead, mine_live, other, old_other):
        path.write_text("x")
    os.utime(old_other, (time.time() - 2 * 86400,) * 2)
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine_live.name, other.name])


# ---- records: damaged, completed, and the only way to a teacher --------------------------------
@pytest.mark.parametrize("content", ["", "[]", '{"key": "digits-0-abc", "step"', "{}"])
def test_a_damaged_record_is_one_line_naming_it(cli, capsys, content):
    assert cli(*DIGITS, "--epochs", 2) == 0
    (path,) = (cli.dirs()["results"] / "records").glob("*.json")
    path.write_text(content)
    capsys.readouterr()
    assert cli(*DIGITS, "--epochs", 2) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert str(path) in line and "delete it" in line
    with pytest.raises(UserError, match="damaged result record"):
        ResultsStore(cli.dirs()["results"]).records()


def test_final_checkpoints_without_a_record_complete_it_without_training(cli, spy):
    assert cli(*DIGITS, "--epochs", 3, "--rounds", 1, "--val-split", "0.1") == 0
    before = {r["key"]: r for r in cli.records()}
    calls = len(spy.calls)
    for path in (cli.dirs()["results"] / "records").glob("*.json"):
        path.unlink()  # as if each process had been killed after last.pt and before the record
    assert cli(*DIGITS, "--epochs", 3, "--rounds", 1, "--val-split", "0.1") == 0
    assert len(spy.calls) == calls  # nothing trained again
    after = {r["key"]: r for r in cli.records()}
    assert numbers_of(after.values()) == numbers_of(before.values())
    assert all(r["completed_from_checkpoints"] for r in after.values())
    assert {k: r["checkpoints"] for k, r in after.items()} == {k: r["checkpoints"] for k, r in before.items()}


def test_a_teacher_is_read_only_through_its_record_and_its_hash(cli, capsys):
    assert cli(*DIGITS, "--epochs", 3, "--dist", 0) == 0
    (teacher,) = cli.records()
    folder = cli.run_folder(teacher)
    # a valid checkpoint, not the chosen one
    (folder / "best.pt").write_bytes((folder / "last.pt").read_bytes())
    capsys.readouterr()
    assert cli(*DIGITS, "--epochs", 3, "--dist", 1) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert (f"checkpoint {folder / 'best.pt'}" in line and "content hash differs" in line
            and "--overwrite" in line)


def test_resumable_state_is_never_a_teacher(cli, spy, capsys):
    def stop(state):
        if state.epoch == 2:
            raise KeyboardInterrupt
    spy.hook = stop
    assert cli(*DIGITS, "--epochs", 4, "--save-every", 1, "--dist", 0) == 130
    spy.hook = None
    assert list(cli.dirs()["ckpt"].rglob("resume.pt")) and not list(cli.dirs()["ckpt"].rglob("best.pt"))
    capsys.readouterr()
    assert cli(*DIGITS, "--epochs", 4, "--dist", 1) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert "has no result record" in line and "--dist 0" in line


def test_a_student_waits_for_a_teacher_that_another_live_process_trains(cli, monkeypatch, capsys):
    """One line says so; when the teacher's record appears, the student trains from it."""
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    (record_path,) = (cli.dirs()["results"] / "records").glob("*.json")
    held = record_path.read_bytes()
    record_path.unlink()
    (teacher_dir,) = cli.dirs()["ckpt"].rglob("0-*")
    for name in ("last.pt",):  # not completable: the teacher looks in training
        (teacher_dir / name).rename(teacher_dir / f"{name}.aside")
    write_lease(teacher_dir, 1, time.time(), host="other-node")
    import utils.engine
    polls = []

    def sleep(seconds):  # the other process finishes the teacher while we wait
        polls.append(seconds)
        (teacher_dir / "last.pt.aside").rename(teacher_dir / "last.pt")
        record_path.write_bytes(held)
        (teacher_dir / LEASE_NAME).unlink()
    monkeypatch.setattr(utils.engine.time, "sleep", sleep)
    assert cli(*DIGITS, "--epochs", 2, "--dist", 1) == 0
    assert len(polls) == 1
    out = capsys.readouterr().out
    assert "step 2: waiting for 1 run that other processes are training (other-node:1)" in out
    assert len(cli.records()) == 2


# ---- the same numbers alone, batched, resumed, and from many processes ---------------------------
def test_one_run_per_batch_gives_the_records_of_the_default_batches(busy, tmp_path):
    recipe, numbers, table = busy(4)
    cli = Cli(tmp_path)
    assert cli("--config", recipe, "--max-batch-runs", 1) == 0
    assert store_numbers(cli.dirs()["results"]) == numbers
    assert tables(cli.dirs()["results"]) == table


def test_processes_and_shards_at_once_train_every_run_once_and_match_one_process(busy, tmp_path):
    reference = busy(4)
    recipe = reference[0]
    procs = [start(recipe, tmp_path, "--shard", f"{i}/3") for i in range(3)] + [start(recipe, tmp_path)]
    outputs = finish(procs)
    assert sum(trained_counts(outputs)) == RUNS  # every run trained once, by one of the four
    assert_same_as_one_process(tmp_path, reference)


def test_processes_killed_at_random_moments_then_rerun_match_one_process(busy, tmp_path):
    reference = busy(100)
    recipe = reference[0]
    rng = random.Random(1)
    procs = [start(recipe, tmp_path) for _ in range(2)]
    procs.remove(kill_mid_grid(procs, tmp_path, rng))
    finish(procs)  # the survivor takes over the victim's runs and completes the grid
    assert_same_as_one_process(tmp_path, reference)
    # the students lose their records: the round-1 students are completed from their final
    # checkpoints, the PLL students lose those too and are retrained by a process killed meanwhile
    for path in (tmp_path / "results" / "records").glob("digits-[1p]-*.json"):
        path.unlink()
        step, digest = path.stem.split("-")[1:]
        if step == "p":
            (folder,) = (tmp_path / "ckpt").glob(f"**/{step}-{digest}")
            shutil.rmtree(folder)
    kill_mid_grid([start(recipe, tmp_path)], tmp_path, rng, within=0.1)
    finish([start(recipe, tmp_path)])
    assert_same_as_one_process(tmp_path, reference)


@pytest.mark.slow
def test_the_issue_scenario_four_processes_three_shards_and_ten_kills(busy, tmp_path):
    reference = busy(100, ISSUE_RECIPE, ISSUE_RUNS)
    recipe = reference[0]
    rng = random.Random(2)
    for what, extra in (("four", [[]] * 4), ("shards", [["--shard", f"{i}/3"] for i in range(3)])):
        store = tmp_path / what
        procs = []
        for args in extra:
            procs.append(start(recipe, store, *args, save_every=5))
            time.sleep(rng.random() * 3)
        assert sum(trained_counts(finish(procs))) == ISSUE_RUNS
        assert_same_as_one_process(store, reference)
    store = tmp_path / "kills"
    for _ in range(10):
        kill_mid_grid([start(recipe, store, save_every=5)], store, rng, within=0.7)
    assert len(list((store / "results" / "records").glob("*.json"))) < ISSUE_RUNS
    finish([start(recipe, store, save_every=5)])
    assert_same_as_one_process(store, reference)


# ---- output directories that cannot be written ----------------------------------------------------
def test_a_checkpoint_root_under_a_file_is_one_line_naming_it(cli, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    code = run_main(train_linear.main, [*DIGITS, "--epochs", "2", "-c", str(blocker / "ckpt"),
                                        "--results", str(tmp_path / "res")])
    assert code == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert str(blocker) in line and "Not a directory" in line
    assert blocker.read_text() == "not a directory" and not (tmp_path / "res" / "records").exists()


def test_a_full_disk_while_finishing_a_run_is_one_line_and_nothing_torn(cli, monkeypatch, capsys):
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    before = {p: p.read_bytes() for p in cli.dirs()["ckpt"].rglob("*") if p.is_file()}
    import utils.io

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(utils.io.os, "fsync", disk_full)
    capsys.readouterr()
    assert cli(*DIGITS, "--epochs", 2, "--dist", 1) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert "No space left on device" in line and "free some space" in line
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in cli.dirs()["ckpt"].rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p in before} == before  # the teacher's files untouched
    assert not [p for p in after if p.name.endswith(".tmp") or p.name == LEASE_NAME]  # lease released
    assert len(cli.records()) == 1
    assert cli(*DIGITS, "--epochs", 2, "--dist", 1) == 0  # and the same command then works


def test_what_a_kill_after_the_record_leaves_is_tidied_by_the_next_command(cli):
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    (folder,) = cli.dirs()["ckpt"].rglob("0-*")
    write_lease(folder, dead_pid(), time.time())
    (folder / "resume.pt").write_bytes(b"stale periodic state")
    (folder / f".log.jsonl.{HOST}.{dead_pid()}.x.tmp").write_text("half")
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]


def test_the_heartbeat_runs_while_an_epoch_is_longer_than_the_timeout(tmp_path):
    from utils.leases import Heartbeat
    lease, _ = try_claim(tmp_path, stale_after=0.4)
    first = read_holder(tmp_path / LEASE_NAME).heartbeat
    with Heartbeat([lease], every=0.1) as beat:
        time.sleep(0.6)  # one long "epoch": no call from the training loop
        assert read_holder(tmp_path / LEASE_NAME).heartbeat > first
        assert try_claim(tmp_path, stale_after=0.4)[0] is None  # still held, not stale
        write_lease(tmp_path, 1, time.time(), host="other-node", token="new")  # taken over
        time.sleep(0.3)
        with pytest.raises(LeaseLost):
            beat.check()
    assert read_holder(tmp_path / LEASE_NAME).token == "new"  # the new holder's lease is untouched
