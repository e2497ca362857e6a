"""The chain engine end to end through `train_linear.main` on the digits features."""
import torch

from conftest import DIGITS, digits_test_set, head_accuracy, stderr_error_lines
import train_linear
from data.corruption import corrupt_labels, corruption_matrix_for
from data.datasets import digits_features
from data.splits import stratified_val_split
from utils.runs import RunConfig, run_key

LOG_FIELDS = {"epoch", "train_loss", "train_acc", "train_top2", "train_acc_true", "train_top2_true", "lr",
              "test_loss", "test_acc", "test_top2"}
RECORD_FIELDS = {"key", "step", "dataset", "backbone", "ctype", "eta", "seed", "lr", "wd", "epochs",
                 "features_id",
                 "teacher_key", "realised_corruption", "teacher_top2_coverage", "best_train_acc",
                 "test_acc_bytest", "test_acc_last", "test_acc_byval", "epoch_bytest", "epoch_last",
                 "epoch_byval",
                 "wall_time_s", "device", "torch_version", "code_version", "created"}
NUMBERS = ("test_acc_bytest", "test_acc_last", "test_acc_byval", "epoch_bytest", "epoch_last", "epoch_byval",
           "best_train_acc", "realised_corruption", "teacher_top2_coverage",
           "test_top2_bytest", "val_acc_byval")


def numbers(record):
    return {k: record.get(k) for k in NUMBERS}


def test_chain_writes_checkpoints_logs_and_records(cli, spy):
    assert cli(*DIGITS, "--rounds", 2, "--epochs", 5) == 0
    recs = cli.by_step()
    assert set(recs) == {"0", "1", "2", "p"}
    x, y = digits_test_set()
    for step, rec in recs.items():
        assert RECORD_FIELDS <= set(rec), RECORD_FIELDS - set(rec)
        assert (rec["dataset"], rec["backbone"], rec["ctype"],
                rec["eta"], rec["seed"]) == ("digits", "pixels", "cc", 0.5, 0)
        assert (rec["lr"], rec["wd"], rec["epochs"], rec["step"]) == (0.05, 5e-3, 5, step)
        assert rec["device"] == "cpu" and rec["torch_version"] == torch.__version__ and rec["wall_time_s"] > 0
        log = cli.log(rec)
        assert [h["epoch"] for h in log] == [1, 2, 3, 4, 5]
        assert all(LOG_FIELDS <= set(h) for h in log)
        accs = [h["test_acc"] for h in log]
        assert rec["test_acc_bytest"] == max(accs) and rec["epoch_bytest"] == accs.index(max(accs)) + 1
        assert rec["test_acc_last"] == accs[-1] and rec["epoch_last"] == 5
        assert rec["test_acc_byval"] is None and rec["epoch_byval"] is None
        assert rec["best_train_acc"] == max(h["train_acc"] for h in log)
        assert all(abs(h["lr"] - 0.05 * 0.98 ** e) < 1e-8 for e, h in enumerate(log))
        assert "seed0" in str(cli.run_folder(rec))
        # checkpoints: plain types, loadable with weights_only=True into nn.Linear(64, 10, bias=False)
        best, last = cli.checkpoint(rec, "best"), cli.checkpoint(rec, "last")
        assert best["epoch"] == rec["epoch_bytest"] and last["epoch"] == 5
        assert best["acc"] == rec["test_acc_bytest"] == best["best_acc"] == last["best_acc"]
        assert last["acc"] == rec["test_acc_last"]
        assert best["step"] == step and best["seed"] == 0 and best["key"] == rec["key"]
        assert best["settings"]["lr"] == 0.05 and best["features"] == rec["features_id"]
        assert best["optimizer"]["momentum_buffer"].shape == (10, 64)
        # accuracies are computed in float32: equal to the exact count within 1e-4 percent
        assert abs(head_accuracy(best["model"]["weight"], x, y) - rec["test_acc_bytest"]) < 1e-4
        assert abs(head_accuracy(last["model"]["weight"], x, y) - rec["test_acc_last"]) < 1e-4
        assert 0 < rec["test_acc_bytest"] <= 100
    assert recs["0"]["teacher_key"] is None
    assert recs["1"]["teacher_key"] == recs["0"]["key"] and recs["2"]["teacher_key"] == recs["1"]["key"]
    assert recs["p"]["teacher_key"] == recs["0"]["key"]
    assert recs["0"]["test_acc_bytest"] > 50  # digits is learnable even at eta 0.5

    # what each step was trained on (the spy saw the tensors handed to the trainer)
    assert [c["epochs"] for c in spy.calls] == [5, 5, 5, 5]
    features = digits_features()
    transition = corruption_matrix_for("cc", 0.5, features.train_x, features.train_y, 10)
    expected_noisy = corrupt_labels(features.train_y, transition, 0)
    for call in spy.calls:  # the same corrupted labels in every round
        assert torch.equal(call["data"].noisy_labels[0], expected_noisy)
        assert torch.equal(call["data"].true_labels[0], features.train_y)
    assert abs(recs["0"]["realised_corruption"]
               - float((expected_noisy != features.train_y).double().mean()) * 100) < 1e-9
    assert len({r["realised_corruption"] for r in recs.values()}) == 1
    w0 = cli.checkpoint(recs["0"], "best")["model"]["weight"]
    w1 = cli.checkpoint(recs["1"], "best")["model"]["weight"]
    t1, t2, tp = spy.calls[1]["targets"], spy.calls[2]["targets"], spy.calls[3]["targets"]
    assert t1.kind == "soft" and t2.kind == "soft" and tp.kind == "partial"
    torch.testing.assert_close(t1.values[0], torch.softmax(features.train_x @ w0.T, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(t2.values[0], torch.softmax(features.train_x @ w1.T, -1), atol=1e-6, rtol=0)
    # the PLL student: top-2 of the round-0 teacher, and starts FROM the teacher's weights
    top2 = (features.train_x @ w0.T).topk(2, -1).indices
    assert torch.equal(tp.values[0], top2)
    assert torch.equal(spy.calls[3]["init"][0], w0)
    coverage = float((top2 == features.train_y[:, None]).any(-1).double().mean() * 100)
    assert abs(recs["p"]["teacher_top2_coverage"] - coverage) < 1e-9
    assert not torch.equal(spy.calls[1]["init"][0], w0)  # distillation students start fresh


def test_chain_equals_one_step_per_process(cli):
    assert cli(*DIGITS, "--rounds", 2, "--epochs", 5, where="chain") == 0
    for extra in (["--dist", 0], ["--dist", 1], ["--dist", 2], ["--partial"]):
        assert cli(*DIGITS, "--epochs", 5, *extra, where="steps") == 0
    chain, steps = cli.by_step("chain"), cli.by_step("steps")
    assert set(chain) == set(steps) == {"0", "1", "2", "p"}
    for step in chain:
        assert chain[step]["key"] == steps[step]["key"]
        assert numbers(chain[step]) == numbers(steps[step]), step


def test_same_seed_reproduces_and_another_seed_differs(cli, spy):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 4) == 0
    first = cli.by_step()
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 4, "--overwrite") == 0
    assert len(spy.calls) == 6  # --overwrite retrained all three steps
    again = cli.by_step()
    for step in first:
        assert numbers(first[step]) == numbers(again[step])
        assert again[step]["created"] >= first[step]["created"]
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 4, "--manualSeed", 1) == 0
    other = [r for r in cli.records() if r["seed"] == 1]
    assert len(other) == 3 and other[0]["key"] not in {r["key"] for r in first.values()}
    assert not torch.equal(spy.calls[0]["data"].noisy_labels, spy.calls[-1]["data"].noisy_labels)


def test_missing_round_names_the_command_that_trains_it(cli, capsys):
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    capsys.readouterr()
    assert cli(*DIGITS, "--epochs", 2, "--dist", 2) == 2
    err = stderr_error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: step 2 of this configuration and seed has no result")
    assert "python train_linear.py" in err[0]
    command = err[0].split("python train_linear.py", 1)[1].split()
    args = train_linear.build_parser().parse_args(command)
    assert [str(s) for s in train_linear.steps_from_args(args)] == ["1"]
    assert cli(*command) == 0  # the suggested command works, and then --dist 2 does
    assert cli(*DIGITS, "--epochs", 2, "--dist", 2) == 0


def _suggested_steps(cli, capsys, *argv):
    capsys.readouterr()
    assert cli(*argv, where="empty") == 2
    err = stderr_error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "python train_linear.py" in err[0], err
    command = err[0].split("python train_linear.py", 1)[1].split()
    return [str(step)
            for step in train_linear.steps_from_args(train_linear.build_parser().parse_args(command))]


def test_missing_teacher_hint_for_students_and_pll(cli, capsys):
    assert _suggested_steps(cli, capsys, *DIGITS, "--epochs", 2, "--dist", 1) == ["0"]
    assert _suggested_steps(cli, capsys, *DIGITS, "--epochs", 2, "--partial") == ["0"]


def test_missing_teacher_hint_after_partial_true_is_a_valid_command(cli, capsys):
    """`--partial True` is accepted; the hint must not keep a stray 'True' (or `--partial True`)."""
    assert _suggested_steps(cli, capsys, *DIGITS, "--epochs", 2, "--partial", "True") == ["0"]


def ctrl_c_after_epoch(epoch: int):
    """A trainer hook that stops the run like Ctrl-C once `epoch` epochs are done."""
    def hook(state):
        if state.epoch == epoch:
            raise KeyboardInterrupt
    return hook


def test_interrupted_run_resumes_from_its_last_save(cli, spy):
    args = (*DIGITS, "--epochs", 6, "--save-every", 2, "--dist", 0)
    spy.hook = ctrl_c_after_epoch(3)
    assert cli(*args) == 130
    assert cli.records() == []
    partial = list(cli.dirs()["ckpt"].rglob("resume.pt"))
    assert len(partial) == 1
    assert torch.load(partial[0], weights_only=True)["epoch"] == 2
    spy.hook = None
    assert cli(*args) == 0
    assert spy.calls[-1]["resume_epoch"] == 2
    assert cli(*args, where="straight") == 0
    assert spy.calls[-1]["resume_epoch"] is None
    (resumed,), (straight,) = cli.records(), cli.records("straight")
    assert resumed["key"] == straight["key"]
    assert numbers(resumed) == numbers(straight)
    assert cli.log(resumed) == cli.log(straight, "straight")
    for kind in ("best", "last"):
        a, b = cli.checkpoint(resumed, kind), cli.checkpoint(straight, kind, "straight")
        assert torch.equal(a["model"]["weight"], b["model"]["weight"]) and a["epoch"] == b["epoch"]


def test_unreadable_partial_checkpoint_restarts_the_run(cli, spy):
    args = (*DIGITS, "--epochs", 4, "--save-every", 2, "--dist", 0)
    spy.hook = ctrl_c_after_epoch(3)
    assert cli(*args) == 130
    (partial,) = cli.dirs()["ckpt"].rglob("resume.pt")
    partial.write_bytes(partial.read_bytes()[:100])
    spy.hook = None
    assert cli(*args) == 0
    assert spy.calls[-1]["resume_epoch"] is None
    assert cli(*args, where="straight") == 0
    assert numbers(cli.records()[0]) == numbers(cli.records("straight")[0])


def test_finished_runs_are_skipped(cli, monkeypatch):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    before = {p.name: p.read_bytes() for p in (cli.dirs()["results"] / "records").glob("*.json")}
    assert len(before) == 3

    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")
    import utils.engine
    monkeypatch.setattr(utils.engine, "train_heads", fail)
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    assert cli(*DIGITS, "--epochs", 3, "--dist", 1) == 0
    after = {p.name: p.read_bytes() for p in (cli.dirs()["results"] / "records").glob("*.json")}
    assert after == before


def test_validation_selection_ignores_test_labels(cli, spy, monkeypatch):
    args = (*DIGITS, "--rounds", 1, "--epochs", 6, "--val-split", 0.1, "--selection", "val")
    assert cli(*args, where="clean") == 0
    clean_calls = list(spy.calls)
    features = digits_features()
    train_rows, val_rows = stratified_val_split(features.train_y.numpy(), 0.1, 0)
    for call in clean_calls:  # the same split in every round
        assert torch.equal(call["data"].train_rows[0], torch.from_numpy(train_rows))
        assert torch.equal(call["data"].val_rows[0], torch.from_numpy(val_rows))
    tr, va = set(train_rows.tolist()), set(val_rows.tolist())
    assert not tr & va and tr | va == set(range(len(features.train_y)))
    assert len(va) == round(0.1 * len(features.train_y))
    counts = torch.bincount(features.train_y, minlength=10)
    val_counts = torch.bincount(features.train_y[val_rows], minlength=10)
    assert ((val_counts - 0.1 * counts).abs() <= 1).all()  # stratified
    noisy = corrupt_labels(features.train_y,
                           corruption_matrix_for("cc", 0.5, features.train_x, features.train_y, 10), 0)
    # validation labels are noisy too
    assert torch.equal(clean_calls[0]["data"].val_labels[0], noisy[val_rows])

    clean = cli.by_step("clean")
    w_val = cli.checkpoint(clean["0"], "best_val", "clean")
    assert w_val["epoch"] == clean["0"]["epoch_byval"]
    # PLL starts from the val-chosen teacher
    assert torch.equal(clean_calls[2]["init"][0], w_val["model"]["weight"])
    for step, rec in clean.items():
        log = cli.log(rec, "clean")
        e = rec["epoch_byval"]
        vals = [h["val_acc"] for h in log]
        assert e == vals.index(max(vals)) + 1
        assert rec["test_acc_byval"] == log[e - 1]["test_acc"] and rec["val_acc_byval"] == max(vals)
        assert (rec["test_acc_bytest"] == max(h["test_acc"] for h in log)
                and rec["test_acc_last"] == log[-1]["test_acc"])

    import utils.engine
    real_load = utils.engine.load_source

    def poisoned(source, opts, log):
        f = real_load(source, opts, log)
        f.test_y = (f.test_y + 1) % f.num_classes
        return f
    monkeypatch.setattr(utils.engine, "load_source", poisoned)
    assert cli(*args, where="poisoned") == 0
    poison_calls = spy.calls[len(clean_calls):]
    bad = cli.by_step("poisoned")
    for step in clean:
        assert bad[step]["epoch_byval"] == clean[step]["epoch_byval"]
        assert bad[step]["val_acc_byval"] == clean[step]["val_acc_byval"]
    # the poison did reach the test set
    assert bad["0"]["test_acc_bytest"] < 50 < clean["0"]["test_acc_bytest"]
    assert torch.equal(poison_calls[1]["targets"].values, clean_calls[1]["targets"].values)  # same teacher
    assert torch.equal(poison_calls[2]["init"], clean_calls[2]["init"])


def test_last_selection_uses_the_last_checkpoint(cli, spy, monkeypatch):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 4, "--last", 1) == 0
    recs = cli.by_step()
    assert recs["1"]["selection"] == recs["p"]["selection"] == "last"
    w_last = cli.checkpoint(recs["0"], "last")["model"]["weight"]
    features = digits_features()
    torch.testing.assert_close(spy.calls[1]["targets"].values[0],
                               torch.softmax(features.train_x @ w_last.T, -1),
                               atol=1e-6, rtol=0)
    assert torch.equal(spy.calls[2]["init"][0], w_last)
    # --selection last is the same configuration: nothing to train
    import utils.engine
    monkeypatch.setattr(utils.engine, "train_heads",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 4, "--selection", "last") == 0


def test_run_keys_follow_what_changes_each_step():
    base = RunConfig("digits", "pixels")
    hot = RunConfig("digits", "pixels", temperature=2.0)
    assert run_key(base, "p", "f") == run_key(hot, "p", "f")     # top-2 ignores the temperature
    assert run_key(base, "0", "f") == run_key(hot, "0", "f")     # the teacher never sees it
    assert run_key(base, "1", "f") != run_key(hot, "1", "f")
    assert run_key(base, "0", "f") != run_key(RunConfig("digits", "pixels", seed=1), "0", "f")
    assert run_key(base, "0", "f") != run_key(base, "0", "g")    # other features, other run


# ---- what a command prints: progress off a terminal, --quiet, finished runs, superclasses -------------
# each line: the step (the tables' names), the time since the command started and what is left of it
STEP_LINE = (r"^step (1 \(Teacher\)|2|PLL): 1 run of digits trained in \d+\.\d s \(epoch 3/3\); "
             r"\d+ s elapsed, (about \d+ s left \((2 of 3|1 of 3) runs\)|none left)$")


def test_off_a_terminal_one_line_per_step_and_no_bars(cli, capsys):
    """capsys's stderr is not a terminal (as under Slurm, nohup or CI): no progress bars, one line
    per finished step instead."""
    import re
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "█" not in out + err and "|" not in out + err
    steps = [line for line in out.splitlines() if re.match(STEP_LINE, line)]
    assert [line.split(":")[0] for line in steps] == ["step 1 (Teacher)", "step 2", "step PLL"]
    assert [line.split("elapsed, ")[1].split(" (")[-1] for line in steps] == ["2 of 3 runs)", "1 of 3 runs)",
                                                                              "none left"]
    assert err == ""


def test_quiet_prints_no_progress_but_the_table(cli, capsys):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3, "--quiet") == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "█" not in out + err and err == ""
    assert " trained in " not in out
    assert "1 (Teacher)" in out and "PLL candidate sets" in out and "realised corruption" in out


def test_on_a_terminal_bars_leave_printed_lines_whole(cli, capsys, monkeypatch):
    """With bars drawn on a terminal, the engine's own lines go through the bars (tqdm.write), so
    each is one clean line on stdout, and no per-step lines are printed."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    out = capsys.readouterr().out
    assert "\r" in terminal.getvalue() and "runs" in terminal.getvalue()  # the bars were drawn there
    assert "\r" not in out and " trained in " not in out
    assert out.splitlines()[0].startswith("superclasses of digits (cc): {")
    assert "1 (Teacher)" in out


def test_rerun_says_the_runs_were_already_finished(cli, capsys):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    first = capsys.readouterr().out
    assert "already finished" not in first
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 3) == 0
    again = capsys.readouterr().out
    records = cli.dirs()["results"] / "records"
    assert f"3 runs already finished (records in {records}/); --overwrite retrains\n" in again
    table = lambda text: text[text.index("digits / pixels"):]  # noqa: E731
    assert table(again) == table(first)  # the same table, from the records
    assert cli(*DIGITS, "--epochs", 3, "--dist", 1, "--quiet") == 0
    assert (f"1 run already finished (records in {records}/); --overwrite retrains\n"
            in capsys.readouterr().out)
    assert cli(*DIGITS, "--epochs", 3, "--dist", 1, "--overwrite") == 0
    assert "already finished" not in capsys.readouterr().out


def test_superclasses_are_printed_once_and_recorded_for_cc_only(cli, capsys):
    from data.corruption import superclass_groups, superclasses_from_features
    f = digits_features()
    groups = superclass_groups(superclasses_from_features(f.train_x, f.train_y, f.num_classes))
    assert sorted(c for g in groups for c in g) == list(range(10)) and len(groups) > 1
    text = ", ".join("{" + ", ".join(map(str, g)) + "}" for g in groups)
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 2) == 0
    out = capsys.readouterr().out
    assert out.count("superclasses of digits (cc): ") == 1 and f"superclasses of digits (cc): {text}\n" in out
    recs = cli.by_step()
    assert all(r["superclasses"] == groups for r in recs.values())
    # the realised corruption moved labels only inside those superclasses
    superclass = {c: i for i, g in enumerate(groups) for c in g}
    noisy = corrupt_labels(f.train_y, corruption_matrix_for("cc", 0.5, f.train_x, f.train_y, 10), 0)
    assert all(superclass[int(a)] == superclass[int(b)] for a, b in zip(noisy, f.train_y))
    assert cli(*DIGITS, "--epochs", 2, "--ctype", "sym", where="sym") == 0
    assert "superclasses of" not in capsys.readouterr().out
    assert "superclasses" not in cli.records("sym")[0]


# ---- the header says every setting that is not at its default -------------------------------------
def test_the_header_lists_every_setting_that_differs_from_its_default(cli, capsys):
    assert cli(*DIGITS, "--dist", 0, "--epochs", 3, "--feature-norm", "l2", "--label-smoothing", 0.1) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("digits / pixels")]
    assert header == ["digits / pixels: ctype=cc eta=0.5 seed=0 lr=0.05 wd=0.005 epochs=3 "
                      "label_smoothing=0.1 feature_norm=l2 on cpu; realised corruption 49.97%"]


def test_every_setting_off_its_default_enters_the_header():
    """Each setting (a new one too) appears in the header exactly when it is off its default."""
    from dataclasses import replace
    from utils.runs import SETTINGS
    from utils.settings import HEADER_SETTINGS, settings_text
    base = RunConfig("digits", "pixels")
    defaults = "ctype=cc eta=0.5 seed=0 lr=0.0005 wd=0.0001"
    assert settings_text(base) == defaults  # at the defaults: the chain's identity and lr, wd only
    other = {"selection": "last", "feature_norm": "standardize", "val_clean": True}
    for name, opt in SETTINGS.items():
        if name in ("dataset", "backbone") + HEADER_SETTINGS:
            continue
        if name in other:
            value = other[name]
        else:
            value = opt.default * 2 + 1 if opt.type is int else (opt.default or 0.1) / 2
        text = f"{value:g}" if isinstance(value, float) else str(value)
        assert settings_text(replace(base, **{name: value})) == f"{defaults} {name}={text}", name


# ---- runs that did not train say so -----------------------------------------------------------------
UNTRAINED = (r"^warning: step 2 of digits looks untrained: its test accuracy \d+\.\d\d% is below chance "
             r"\(10\.0%\) while its teacher reached \d+\.\d\d%; likely cause: too small a learning rate or "
             r"too few epochs for these features \(--lr 0\.0005, --epochs 200\); the demo trains the digits "
             r"with --lr 0\.05 --wd 5e-3$")


def test_the_original_defaults_on_digits_warn_that_the_student_did_not_train(cli, capsys):
    """The faithful defaults (lr 5e-4, wd 1e-4) leave the digits' first student below chance (6.1%,
    with a 52.8% teacher): one warning line, and the record says why."""
    import re
    assert cli("-d", "digits", "--rounds", 1) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.match(UNTRAINED, warnings[0]), warnings
    recs = cli.by_step()
    assert recs["1"]["not_trained"] == warnings[0].split("untrained: ")[1].split("; likely")[0]
    assert "not_trained" not in recs["0"] and "not_trained" not in recs["p"]
    assert recs["1"]["test_acc_bytest"] < 10.0 < recs["0"]["test_acc_bytest"] - 0.25 * 90


def test_a_teacher_near_chance_on_its_own_labels_warns(cli, capsys):
    assert cli("-d", "digits", "--dist", 0, "--epochs", 2) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: step 1 (Teacher) of digits looks untrained: its training accuracy on its own (noisy) "
        "labels never exceeded ")
    assert "near chance (10.0%; a model of the true classes gets about 50% on these labels)" in warnings[0]
    assert "(--lr 0.0005, --epochs 2)" in warnings[0]
    assert cli.by_step()["0"]["not_trained"].startswith("its training accuracy on its own (noisy) labels")


def test_the_demo_settings_warn_of_nothing(cli, capsys):
    assert cli(*DIGITS, "--rounds", 1, "--epochs", 20, "--corruption", 0.9) == 0
    assert "warning:" not in capsys.readouterr().out
    assert not any("not_trained" in r for r in cli.records())


# ---- labels that are probably wrong -------------------------------------------------------------------
def test_one_based_labels_a_missing_test_class_and_a_small_test_split_warn(cli, capsys, tmp_path):
    import numpy as np
    from conftest import blob_features
    arrays = blob_features(num_train=150, num_test=30, num_classes=3)
    arrays["train_labels"] = arrays["train_labels"] + 1     # 1..3: class 0 empty, K = 4
    arrays["test_labels"] = np.where(arrays["test_labels"] == 2, 1, arrays["test_labels"]) + 1  # no class 3
    np.savez(tmp_path / "feats.npz", **arrays)
    assert cli("--features", tmp_path / "feats.npz", "--dist", 0, "--epochs", 3, "--lr", 0.05) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: feats:")]
    assert warnings == [
        "warning: feats: class 0 of 4 has no training sample; the labels run from 1 to 3: if they count "
        "from 1, store labels - 1",
        "warning: feats: class 3 has training samples but no test sample: test accuracy says nothing "
        "about it",
        "warning: feats: the test split has 30 samples, so one sample moves test accuracy by 3.3 points: "
        "differences between steps of that size are noise"]


def test_label_warnings_name_the_classes():
    from utils.sanity import label_warnings
    assert label_warnings([0, 1, 2, 2], [0, 1, 2] * 20, 3, "x") == []
    lines = label_warnings(list(range(12)) * 5, list(range(20)) * 5, 20, "x")
    assert lines == ["warning: x: classes 12, 13, 14, 15, 16, 17, 18, 19 of 20 have no training sample: "
                     "nothing teaches a probe such a class; check the labels and num_classes"]
    lines = label_warnings(list(range(25)) * 2, [0] * 60, 25, "x")
    assert lines == ["warning: x: classes 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 14 more have training samples "
                     "but no test sample: test accuracy says nothing about them"]


# ---- off a terminal: elapsed time and an estimate of what is left -------------------------------------
def test_the_estimate_of_what_is_left_is_the_time_per_trained_run_epoch_times_the_epochs_left(monkeypatch):
    import utils.progress
    from utils.progress import Progress, duration
    now = [1000.0]
    monkeypatch.setattr(utils.progress.time, "time", lambda: now[0])
    progress = Progress("lines", log=lambda line: None)
    count = progress.runs(total=5, epochs=100)
    assert count.estimate() == "0 s elapsed"
    now[0] += 10.0
    count.update(2)
    count.trained(2, 100)   # 200 run-epochs in 10 s: 0.05 s each; 3 runs of 100 epochs left: 15 s
    assert count.estimate() == "10 s elapsed, about 15 s left (3 of 5 runs)"
    count.update(3)
    assert count.estimate() == "10 s elapsed, none left"
    assert [duration(s) for s in (4.4, 65, 3600 * 2 + 7 * 60 + 20)] == ["4 s", "1 min 05 s", "2 h 07 min"]
