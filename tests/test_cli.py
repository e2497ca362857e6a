"""Every bad input is one stderr line that names the fix, and exit code 2 - never a traceback.

Also the boolean flags: `--partial False` must mean False (the original parsed it with type=bool).
"""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DIGITS, ROOT, blob_features, stderr_error_lines
import train_linear
from utils.cli import run_main


def one_error(capsys, rc, *needles, alone=True) -> str:
    """The run's single error line, after checking exit code 2, no traceback, and that the line is
    the last thing on stderr (alone=True: the ONLY thing on stderr)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = stderr_error_lines(err)
    assert len(lines) == 1, err
    assert err.endswith(lines[0] + "\n"), err
    if alone:
        assert err == lines[0] + "\n", err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- settings the maths cannot take --------------------------------------------------------------
DATASET_CHOICES = ("digits", "cifar10", "cifar100", "food101", "stanfordcars", "flowers102", "caltech101",
                   "caltech256", "imagefolder")

BAD_SETTINGS = [
    (["-d", "nosuch"], ["unknown dataset 'nosuch'", *DATASET_CHOICES, "--features"]),
    ([], ["choose a dataset with -d", "cifar100", "--features PATH"]),
    (["-d", "cifar10", "--arch", "vgg16"], ["unknown --arch 'vgg16'", "resnet18", "resnet50", "vit_b_16"]),
    (["-d", "cifar10", "--depth", "20"], ["--depth 20", "18, 34 or 50"]),
    (["-d", "cifar10", "--depth", "deep"], ["--depth", "invalid int value"]),
    (["--ctype", "uniform"], ["--ctype: invalid choice: 'uniform'", "sym", "asym", "cc"]),
    (["--corruption", "1.5"], ["--corruption must lie in [0, 1], got 1.5"]),
    (["--corruption", "-0.1"], ["--corruption must lie in [0, 1], got -0.1"]),
    (["--corruption", "nan"], ["--corruption must be a finite number, got nan"]),
    (["--lr", "0"], ["--lr must be > 0, got 0.0"]),
    (["--lr", "-0.1"], ["--lr must be > 0, got -0.1"]),
    (["--learning-rate", "nan"], ["--lr must be a finite number, got nan"]),
    (["--epochs", "0"], ["--epochs must be an integer in [1, 100000], got 0"]),
    (["--epochs", "-3"], ["--epochs must be an integer in [1, 100000], got -3"]),
    (["--train-batch", "0"], ["--train-batch must be >= 1"]),
    (["--test-batch", "0"], ["--test-batch must be >= 1"]),
    (["--wd", "-0.0001"], ["--wd must be >= 0"]),
    (["--wd", "-1e-4"], ["--wd must be >= 0, got -0.0001"]),  # a negative number in any notation is a value
    (["--momentum", "1.0"], ["--momentum", "[0, 1)"]),
    (["--gamma", "0"], ["--gamma", "(0, 1]"]),
    (["--label-smoothing", "1.0"], ["--label-smoothing", "[0, 1)"]),
    (["--label-smoothing", "-0.1"], ["--label-smoothing", "[0, 1)"]),
    (["--temperature", "0"], ["--temperature must be > 0"]),
    (["--temperature", "-2"], ["--temperature must be > 0"]),
    (["--val-split", "0.6"], ["--val-split", "(0, 0.5]"]),
    (["--val-split", "-0.1"], ["--val-split", "(0, 0.5]"]),
    (["--val-split", "1"], ["--val-split", "(0, 0.5]"]),
    (["--selection", "val"], ["--selection val needs a validation split", "--val-split 0.1"]),
    (["--selection", "best"], ["--selection", "invalid choice", "test", "val", "last"]),
    (["--last", "1", "--selection", "test"], ["--last 1 means --selection last"]),
    (["--val-clean"], ["--val-clean needs a validation split", "--val-split"]),
    (["--last", "2"], ["--last", "invalid choice"]),
    (["--dist", "-1"], ["--dist must be an integer in [0, 1000], got -1"]),
    (["--rounds", "-1"], ["--rounds must be an integer in [0, 1000], got -1"]),
    (["--epochs", "ten"], ["--epochs", "invalid int value"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    # seeds: numpy's RandomState (the validation split) takes [0, 2**32 - 1]
    (["--manualSeed", "-1"], ["--manualSeed must be an integer in [0, 4294967295]", "got -1"]),
    (["--manualSeed", str(2**32)], ["--manualSeed must be an integer in [0, 4294967295]", f"got {2**32}"]),
    # non-finite floats: each refused as such, naming the option and the value (as numerical_solving.py)
    (["--temperature", "inf"], ["--temperature must be a finite number, got inf"]),
    (["--temperature", "nan"], ["--temperature must be a finite number, got nan"]),
    (["--lr", "inf"], ["--lr must be a finite number, got inf"]),
    (["--wd", "inf"], ["--wd must be a finite number, got inf"]),
    (["--momentum", "nan"], ["--momentum must be a finite number, got nan"]),
    (["--momentum", "inf"], ["--momentum must be a finite number, got inf"]),
    (["--gamma", "nan"], ["--gamma must be a finite number, got nan"]),
    (["--gamma", "-inf"], ["--gamma must be a finite number, got -inf"]),
    (["--label-smoothing", "nan"], ["--label-smoothing must be a finite number, got nan"]),
    (["--label-smoothing=-inf"], ["--label-smoothing must be a finite number, got -inf"]),
    (["--corruption", "inf"], ["--corruption must be a finite number, got inf"]),
    (["--val-split", "nan"], ["--val-split must be a finite number, got nan"]),
    (["--val-split", "0.7"], ["--val-split must lie in (0, 0.5] or be 0, got 0.7"]),
    (["--lease-timeout", "0"], ["--lease-timeout must be > 0 (seconds), got 0.0"]),
]


@pytest.mark.parametrize("extra, needles", BAD_SETTINGS,
                         ids=[" ".join(a) or "no-dataset" for a, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_and_exit_2(cli, capsys, no_training, extra, needles):
    base = [] if "-d" in extra or not extra else ["-d", "digits"]
    one_error(capsys, cli(*base, *extra), *needles)
    assert not cli.dirs()["results"].exists()  # nothing was written before the check


def test_nan_weight_decay_names_wd(cli, capsys):
    one_error(capsys, cli(*DIGITS[:2], "--epochs", 1, "--wd", "nan"), "--wd")


def test_val_split_too_small_for_the_classes(cli, capsys):
    one_error(capsys, cli(*DIGITS, "--epochs", 1, "--val-split", "0.001", "--selection", "val"),
              "--val-split 0.001", "10 classes", alone=False)


# ---- features files ---------------------------------------------------------------------------------
def save_npz(path, arrays):
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def save_pt(path, arrays):
    def plain(v):
        try:
            return torch.as_tensor(v)
        except TypeError:   # strings: a list (weights_only loads it) rather than a numpy array
            return np.asarray(v).tolist()
    torch.save({k: plain(v) for k, v in arrays.items()}, path)
    return path


def with_(**changes):
    arrays = blob_features()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


BAD_FEATURES = {
    "train rows vs labels": (with_(train_labels=np.zeros(149, np.int64)), ["one entry per row", "150 rows"]),
    "test rows vs labels": (with_(test_labels=np.zeros(61, np.int64)), ["one entry per row", "60 rows"]),
    "train vs test dim": (with_(test_features=np.zeros((60, 5), np.float32)),
                          ["d=6", "d=5", "same backbone"]),
    "1-D features": (with_(train_features=np.zeros(150, np.float32)), ["2-D (N, d)"]),
    "2-D labels": (with_(train_labels=np.zeros((150, 1), np.int64)), ["1-D"]),
    "label above num_classes": (with_(num_classes=np.array(2)), ["labels must lie in [0, 2)", "[0, 2]"]),
    "negative label": (with_(test_labels=np.full(60, -1)), ["labels must lie in [0,", "[-1,"]),
    "fractional labels": (with_(train_labels=np.full(150, 0.5)), ["integer class ids"]),
    "string labels": (with_(train_labels=np.array(["cat"] * 150)), ["train_labels is not a numeric array"]),
    "num_classes not a number": (with_(num_classes=np.array("ten")), ["num_classes must be one integer"]),
    "one class": (with_(train_labels=np.zeros(150, np.int64), test_labels=np.zeros(60, np.int64)),
                  ["at least 2 classes"]),
    "NaN feature": (with_(test_features=np.full((60, 6), np.nan, np.float32)), ["NaN or inf", "recompute"]),
    "float64 overflowing float32": (with_(train_features=np.full((150, 6), 1e300)), ["NaN or inf"]),
    "empty train split": (with_(train_features=np.zeros((0, 6), np.float32),
                                train_labels=np.zeros(0, np.int64)),
                          ["is empty", "at least one row"]),
    "zero-width features": (with_(train_features=np.zeros((150, 0), np.float32),
                                  test_features=np.zeros((60, 0), np.float32)), ["is empty"]),
    "missing key": (with_(test_labels=None), ["without test_labels", "Features-file format"]),
    # class counts no run could use: refused before anything of size K is allocated
    "huge label": (with_(train_labels=np.where(np.arange(150) == 7, 2**40, np.arange(150) % 3)),
                   ["labels go up to 1099511627776", "1,099,511,627,777 classes", "at most 100,000 classes"]),
    "huge num_classes": (with_(num_classes=np.array(10**9)),
                         ["num_classes is 1000000000", "1,000,000,000 classes", "at most 100,000 classes"]),
    "huge float num_classes": (with_(num_classes=np.array(1e9)),
                               ["num_classes is 1000000000", "at most 100,000"]),
    "more classes than training samples": (with_(num_classes=np.array(151)),
                                           ["num_classes is 151", "more than its 150 training samples"]),
    "all labels negative": (with_(train_labels=np.full(150, -5), test_labels=np.full(60, -2)),
                            ["labels must lie in [0, K)", "found [-5, -2]"]),
    "infinite float label": (with_(train_labels=np.where(np.arange(150) == 3, np.inf, np.arange(150) % 3)),
                             ["integer class ids", "train_labels holds inf"]),
    "NaN float label": (with_(test_labels=np.where(np.arange(60) == 3, np.nan, np.arange(60) % 3)),
                        ["integer class ids", "test_labels holds nan"]),
}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("case", list(BAD_FEATURES))
def test_inconsistent_features_file_is_one_line(cli, capsys, tmp_path, no_training, case, suffix):
    arrays, needles = BAD_FEATURES[case]
    path = tmp_path / f"feats{suffix}"
    (save_npz if suffix == ".npz" else save_pt)(path, arrays)
    # the engine's progress bar may precede the error line (alone=False); the error must end stderr
    one_error(capsys, cli("--features", path, "--epochs", 1), f"features file {path}", *needles, alone=False)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_features_file_with_wrong_keys_lists_required_and_present_keys(cli, capsys, tmp_path,
                                                                       no_training, suffix):
    arrays = blob_features()
    renamed = {"X_train": arrays["train_features"], "y_train": arrays["train_labels"],
               "X_test": arrays["test_features"], "y_test": arrays["test_labels"]}
    path = tmp_path / f"feats{suffix}"
    (save_npz if suffix == ".npz" else save_pt)(path, renamed)
    line = one_error(capsys, cli("--features", path, "--epochs", 1), alone=False)
    assert line == (f"error: features file {path} must hold train_features, train_labels, test_features, "
                    "test_labels (optional: num_classes, name, backbone, class_names) but has "
                    "[X_test, X_train, y_test, y_train] (see README, 'Features-file format')")


def test_features_file_missing_one_key_names_it_after_the_required_ones(cli, capsys, tmp_path, no_training):
    arrays = blob_features()
    del arrays["test_labels"]
    path = save_npz(tmp_path / "feats.npz", arrays)
    line = one_error(capsys, cli("--features", path, "--epochs", 1), alone=False)
    assert line.endswith("but has [test_features, train_features, train_labels], without test_labels "
                         "(see README, 'Features-file format')")
    assert line.count("train_features") == 2 and line.count("test_labels") == 2  # required; present or absent


def test_class_count_beyond_memory_is_refused_before_allocating(cli, capsys, tmp_path,
                                                                no_training, monkeypatch):
    """K = 3, d = 6 need about 1 KiB (48 K^2 + 32 K d bytes); a machine with 1000 bytes cannot run it."""
    import data.features
    monkeypatch.setattr(data.features, "_physical_memory", lambda: 1000)
    path = save_npz(tmp_path / "feats.npz", blob_features())
    one_error(capsys, cli("--features", path, "--epochs", 1),
              f"features file {path}: labels go up to 2, i.e. 3 classes",
              "K x K matrices and K x 6 weights need about 1008 bytes, "
              "more than the 1000 bytes of memory here",
              alone=False)


def test_huge_labels_never_reach_the_corruption_code(cli, capsys, tmp_path, monkeypatch):
    """The bound holds before any K x K matrix: corruption_matrix_for is never called."""
    import utils.labels
    monkeypatch.setattr(utils.labels, "corruption_matrix_for", lambda *a: pytest.fail("K-sized work started"))
    arrays = with_(num_classes=np.array(2**40))
    path = save_pt(tmp_path / "feats.pt", arrays)
    one_error(capsys, cli("--features", path, "--epochs", 1), "num_classes is 1099511627776",
              "at most 100,000",
              alone=False)


def test_val_split_with_a_single_sample_class_names_the_class(cli, capsys, tmp_path, no_training):
    labels = np.arange(150) % 3
    labels[labels == 2] = 0
    labels[5] = 2  # class 2: one training sample
    path = save_npz(tmp_path / "feats.npz", with_(train_labels=labels))
    one_error(capsys, cli("--features", path, "--epochs", 1, "--val-split", 0.1),
              "--val-split 0.1: class 2 has only 1 training sample", "at least 2 per class",
              "drop --val-split",
              alone=False)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_missing_features_file(cli, capsys, tmp_path, suffix):
    path = tmp_path / f"nowhere{suffix}"
    one_error(capsys, cli("--features", path), f"features file not found: {path}",
              "Point --features at a .pt/.npz",
              alone=False)


@pytest.mark.parametrize("kind", ["truncated .pt", "truncated .npz", "garbage .pt", "garbage .npz",
                                  "text .npz",
                                  "tensor .pt", "pickled object .pt"])
def test_unreadable_features_file(cli, capsys, tmp_path, kind):
    suffix = kind.split()[-1]
    path = tmp_path / f"feats{suffix}"
    if kind.startswith("truncated"):
        (save_npz if suffix == ".npz" else save_pt)(path, blob_features())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind.startswith("garbage"):
        path.write_bytes(bytes(range(256)) * 8)
    elif kind.startswith("text"):
        path.write_text("train_features,train_labels\n1,2\n")
    elif kind.startswith("tensor"):
        torch.save(torch.zeros(3, 4), path)
    else:  # a pickle that weights_only=True refuses: must not be executed, and must not crash
        import argparse
        torch.save(argparse.Namespace(train_features=1), path)
    line = one_error(capsys, cli("--features", path), f"features file {path}", "Point --features at",
                     alone=False)
    assert "\n" not in line


def test_bad_features_file_prints_only_the_error_line(cli, capsys, tmp_path):
    path = tmp_path / "feats.npz"
    path.write_bytes(b"junk")
    one_error(capsys, cli("--features", path), "features file", alone=True)


def test_accepts_bfloat16_and_grad_carrying_tensors(cli, tmp_path):
    arrays = {k: torch.as_tensor(v) for k, v in blob_features().items()}
    arrays["train_features"] = arrays["train_features"].to(torch.bfloat16)
    arrays["test_features"] = (arrays["test_features"].requires_grad_(True) * 1.0)  # not a leaf
    path = tmp_path / "half.pt"
    torch.save(arrays, path)
    assert cli("--features", path, "--epochs", 2, "--lr", 0.05) == 0


# ---- files the tool wrote itself: feature cache, teacher checkpoint ----------------------------------
def test_corrupt_feature_cache_names_the_file_to_delete(cli, capsys, no_training):
    """Documented behaviour: an unreadable cache is not silently re-extracted; the line says to delete it."""
    cache = cli.dirs()["cache"] / "cifar10_resnet18-random.pt"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"PK\x03\x04 half a zip")
    args = ("-d", "cifar10", "--arch", "resnet18", "--pretrained", "False", "--epochs", 1)
    one_error(capsys, cli(*args), f"feature cache {cache}", f"Delete {cache} to re-extract", alone=False)


def test_cache_written_for_another_backbone_is_refused(cli, capsys, no_training):
    from data.datasets import digits_features
    from data.features import save_features

    cache = cli.dirs()["cache"] / "cifar10_resnet18-random.pt"
    feats = digits_features()
    feats.backbone = "resnet50"
    save_features(cache, feats)
    one_error(capsys, cli("-d", "cifar10", "--depth", 18, "--pretrained", "0"),
              f"feature cache {cache} was not written for cifar10/resnet18-random", "Delete", alone=False)


def _truncate_teacher(cli):
    teacher = next(cli.dirs()["ckpt"].rglob("0-*/best.pt"))
    data = teacher.read_bytes()
    teacher.write_bytes(data[: len(data) // 2])
    return teacher


def test_truncated_teacher_checkpoint_is_one_line_naming_it(cli, capsys):
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    teacher = _truncate_teacher(cli)
    capsys.readouterr()
    for step in (["--dist", 1], ["--partial"]):
        line = one_error(capsys, cli(*DIGITS, "--epochs", 2, *step), f"checkpoint {teacher}",
                         "content hash differs",
                         "--dist 0", alone=False)
        assert "\n" not in line


def test_command_named_for_a_truncated_teacher_repairs_it(cli, capsys):
    assert cli(*DIGITS, "--epochs", 2, "--dist", 0) == 0
    _truncate_teacher(cli)
    capsys.readouterr()
    line = one_error(capsys, cli(*DIGITS, "--epochs", 2, "--dist", 1), alone=False)
    command = line.split("python train_linear.py ", 1)[1].split()
    assert run_main(train_linear.main, command) == 0  # the command exactly as the line gives it
    assert cli(*DIGITS, "--epochs", 2, "--dist", 1) == 0



# ---- boolean flags ----------------------------------------------------------------------------------
BOOL_FLAGS = {"--partial": False, "--pretrained": True, "--val-clean": False, "--overwrite": False}
BOOL_WORDS = [("True", True), ("true", True), ("1", True), ("yes", True), ("on", True),
              ("False", False), ("false", False), ("0", False), ("no", False), ("OFF", False)]


def parsed(flag, argv):
    args = train_linear.build_parser().parse_args(["-d", "digits", *argv])
    return getattr(args, flag[2:].replace("-", "_")), args


@pytest.mark.parametrize("flag", list(BOOL_FLAGS))
def test_boolean_flag_default_and_bare(flag):
    assert parsed(flag, [])[0] is BOOL_FLAGS[flag]
    value, args = parsed(flag, [flag, "--epochs", "3"])  # a bare flag does not swallow the next option
    assert value is True and args.epochs == 3
    assert parsed(flag, ["--epochs", "3", flag])[0] is True


@pytest.mark.parametrize("word, value", BOOL_WORDS)
@pytest.mark.parametrize("flag", list(BOOL_FLAGS))
def test_boolean_flag_words(flag, word, value):
    got, args = parsed(flag, [flag, word, "--epochs", "3"])
    assert got is value and args.epochs == 3   # 'False' is False (the original's type=bool made it True)
    assert parsed(flag, [f"{flag}={word}"])[0] is value


@pytest.mark.parametrize("flag", list(BOOL_FLAGS))
@pytest.mark.parametrize("word", ["maybe", "2", "Falsy"])
def test_boolean_flag_rejects_other_words(cli, capsys, no_training, flag, word):
    one_error(capsys, cli(*DIGITS, flag, word), f"argument {flag}", "expected a boolean", repr(word))


def test_partial_false_trains_the_teacher_and_partial_true_the_pll_student(cli, capsys):
    assert cli(*DIGITS, "--epochs", 1, "--partial", "False") == 0
    assert [r["step"] for r in cli.records()] == ["0"]
    capsys.readouterr()
    # PLL student (needs the teacher): in another store, so its missing teacher shows which step it is
    one_error(capsys, cli(*DIGITS, "--epochs", 1, "--partial", "True", where="b"), "step 1 (Teacher)",
              "--dist 0", alone=False)
    assert cli(*DIGITS, "--epochs", 1, "--partial", where="a") == 0
    assert sorted(r["step"] for r in cli.records()) == ["0", "p"]


def test_overwrite_false_skips_and_overwrite_retrains(cli, monkeypatch):
    assert cli(*DIGITS, "--epochs", 1) == 0
    import utils.engine
    real, calls = utils.engine.train_heads, []
    monkeypatch.setattr(utils.engine, "train_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli(*DIGITS, "--epochs", 1, "--overwrite", "False") == 0
    assert calls == []
    assert cli(*DIGITS, "--epochs", 1, "--overwrite", "0") == 0
    assert calls == []
    assert cli(*DIGITS, "--epochs", 1, "--overwrite", "True") == 0
    assert calls == [1]


@pytest.mark.parametrize("words, pretrained", [([], True), (["--pretrained"], True),
                                               (["--pretrained", "False"], False),
                                               (["--pretrained", "false"], False),
                                               (["--pretrained", "0"], False)])
def test_pretrained_words_choose_the_weights(words, pretrained):
    args = train_linear.build_parser().parse_args(["-d", "cifar10", "--depth", "50", *words])
    source = train_linear.source_from_args(args)
    assert (source.arch, source.pretrained) == ("resnet50", pretrained)
    assert source.tag() == ("resnet50" if pretrained else "resnet50-random")


def test_val_clean_false_needs_no_split_and_true_does(cli, capsys):
    assert cli(*DIGITS, "--epochs", 1, "--val-clean", "False") == 0
    capsys.readouterr()
    one_error(capsys, cli(*DIGITS, "--epochs", 1, "--val-clean", "true"),
              "--val-clean needs a validation split")


# ---- what the user sees from a shell -----------------------------------------------------------------
def run_script(tmp_path, *argv):
    dirs = ["--checkpoint", tmp_path / "c", "--results", tmp_path / "r", "--cache-dir", tmp_path / "k"]
    return subprocess.run([sys.executable, "train_linear.py", *map(str, argv), *map(str, dirs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_shell_sees_one_line_and_exit_2(tmp_path):
    proc = run_script(tmp_path, "-d", "digits", "--partial", "maybe")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: train_linear.py: argument --partial: expected a boolean")
    assert proc.stdout == ""


@pytest.mark.parametrize("extra", [["--shard", "0/2"], ["--report-only"], ["--allow-large-grid"]])
def test_grid_only_options_without_config(cli, capsys, extra):
    one_error(capsys, cli(*DIGITS, "--epochs", 1, *extra), "--config")
    assert not cli.dirs()["results"].exists()


# ---- names never escape their roots ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "ABS", "a/b", ".hidden", "..", "", "a b", "x" * 101])
def test_dataset_name_with_features_must_be_a_plain_name(cli, capsys, tmp_path, no_training, name):
    if name == "ABS":
        name = str(tmp_path / "abs")  # absolute: would otherwise replace the checkpoint root
    path = save_npz(tmp_path / "feats.npz", blob_features())
    one_error(capsys, cli("--features", path, "-d", name, "--epochs", 1), f"-d {name!r} is not a plain name",
              "letters, digits, '_', '-', '.', '+'", "not starting with '.'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npz"]  # nothing written anywhere


def files_under(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("backbone, mapped", [("../../evil", "_.._evil"), ("ViT-B/16", "ViT-B_16"),
                                              ("ABS", None), ("..", "custom")])
def test_backbone_and_name_of_a_features_file_are_mapped_to_plain_names(cli, tmp_path, monkeypatch, backbone,
                                                                       mapped):
    """Whatever the file says, every file the run writes lies under -c, --results or --cache-dir."""
    if backbone == "ABS":  # an absolute path inside tmp_path, so that a regression cannot write elsewhere
        backbone = str(tmp_path / "abs")
        mapped = re.sub(r"[^A-Za-z0-9_.+-]", "_", backbone)[:100]  # '/' (and any odd character) -> '_'
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # relative escapes would land in tmp_path too, where the walk below sees them
    arrays = blob_features()
    arrays.update(backbone=np.array(backbone), name=np.array("../../../name"))
    path = save_npz(tmp_path / "feats.npz", arrays)
    assert cli("--features", path, "--rounds", 1, "--epochs", 2, "--lr", 0.05) == 0
    roots = [cli.dirs()[k] for k in ("ckpt", "results", "cache")]
    written = [p for p in files_under(tmp_path) if p != path]
    assert written and all(any(root in p.parents for root in roots) for p in written), written
    recs = cli.records()
    assert {(r["dataset"], r["backbone"]) for r in recs} == {("feats", mapped)}
    assert all(cli.run_folder(r).relative_to(cli.dirs()["ckpt"]).parts[:2] == ("feats", mapped) for r in recs)
    # the file's own name is mapped the same way when it names the features (no -d, library use)
    from data.features import load_features_file
    loaded = load_features_file(path)
    assert (loaded.name, loaded.backbone) == ("_.._.._name", mapped)


def test_odd_file_stem_is_mapped_to_a_plain_dataset_name(cli, tmp_path):
    path = save_npz(tmp_path / ".my feats.npz", blob_features())
    assert cli("--features", path, "--epochs", 1, "--lr", 0.05) == 0
    assert {r["dataset"] for r in cli.records()} == {"my_feats"}


def test_safe_name_keeps_plain_names_and_maps_the_rest():
    from utils.names import check_plain_name, is_plain_name, safe_name
    for plain in ("digits", "cifar100", "resnet18-random", "clip_vit.b+16", "imagefolder-pets-0a1b2c3d"):
        assert is_plain_name(plain) and safe_name(plain) == plain and check_plain_name(plain, "-d") == plain
    for text, mapped in (("a/b", "a_b"), ("../x", "_x"), ("...", "custom"), ("/abs", "_abs"), ("a\\b", "a_b"),
                         ("\u00e9", "_"), ("x" * 300, "x" * 100)):
        assert safe_name(text) == mapped and is_plain_name(mapped) and not is_plain_name(text)


# ---- --help and the README's option tables -----------------------------------------------------
def shown_default(action) -> str:
    """An option's default as --help and the README show it ('-' when it has none)."""
    help_text = action.help or ""
    if "(default: " in help_text:  # a default the help text states itself, e.g. resnet<depth>
        return help_text.split("(default: ")[1].split(";")[0].split(")")[0]
    return "-" if action.default is None else str(action.default)


def parser_options():
    return [a for a in train_linear.build_parser()._actions if a.option_strings and a.dest != "help"]


def test_help_shows_every_option_with_help_text_default_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_linear.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    body = text[text.index("options: -h, --help"):]
    actions = parser_options()
    starts = []
    for action in actions:  # where each option's entry starts, in order
        starts.append(body.index(action.option_strings[0] + " ", starts[-1] + 1 if starts else 0))
    for i, action in enumerate(actions):
        entry = body[starts[i]:starts[i + 1] if i + 1 < len(starts) else len(body)]
        assert action.help, f"{action.option_strings} has no help text"
        if action.default is not None or "(default: " in action.help:
            assert f"(default: {shown_default(action)}" in entry, (action.option_strings, entry)
    for needle in ("--epochs EPOCHS epochs per step (default: 200)",
                   "--train-batch TRAIN_BATCH training batch size "
                   "(default: 128)", "--lr LR, --learning-rate LR initial learning rate (default: 0.0005)",
                   "--momentum MOMENTUM SGD momentum (default: 0.9)",
                   "--weight-decay WD, --wd WD weight decay "
                   "(default: 0.0001)", "--ctype {sym,asym,cc}", "(default: cc)", "--quiet [BOOL]"):
        assert needle in body, needle


def readme_option_rows() -> dict:
    """{option strings: default} of the README's two option tables (section "### Options")."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Options"):text.index("Boolean options accept")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("Option", "---"):
            continue
        names = tuple(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", cells[0]))
        assert names and names not in rows, line
        rows[names] = cells[1].strip("`")
    return rows


def same_default(readme: str, action) -> bool:
    shown = shown_default(action)
    if isinstance(action.default, float) and not isinstance(action.default, bool):
        return float(readme) == action.default
    return readme == shown


def test_readme_option_tables_list_the_parser_options_and_defaults():
    rows = readme_option_rows()
    actions = {tuple(a.option_strings): a for a in parser_options()}
    assert set(rows) == set(actions), (set(rows) ^ set(actions))
    for names, default in rows.items():
        assert same_default(default, actions[names]), (names, default, shown_default(actions[names]))


# ---- fast answers: the command line is checked before torch is imported -----------------------------
# Importing train_linear and answering --help or a bad value took 3-8 s (torch alone: 2-4 s here);
# without torch it takes about 0.1 s. The bound is generous for a busy shared machine; the check that
# torch was never imported is the one that cannot be noisy.
ANSWER_SECONDS = 1.5
ANSWER = """
import sys, time
start = time.perf_counter()
try:
    import train_linear
    from utils.cli import run_main
    code = run_main(train_linear.main, sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("ANSWER", code, "torch" in sys.modules, time.perf_counter() - start)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["-d", "digits", "--corruption", "50"], 2),
                                        (["--corruptoin", "0.3"], 2), (["-d", "nosuch"], 2),
                                        (["-d", "digits", "--rounds", "2", "--lr", "0"], 2),
                                        (["--config", "recipes/nosuch.yaml"], 2)],
                         ids=["help", "bad value", "mistyped flag", "unknown dataset", "bad lr", "no recipe"])
def test_help_and_argument_errors_answer_without_importing_torch(argv, code):
    proc = subprocess.run([sys.executable, "-c", ANSWER, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    _, got, torch_imported, seconds = proc.stdout.splitlines()[-1].split()
    assert (int(got), torch_imported) == (code, "False"), proc.stdout + proc.stderr
    assert float(seconds) < ANSWER_SECONDS
    if code == 2:
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


@pytest.mark.parametrize("typed, meant", [("--corruptoin", "--corruption"), ("--wdd", "--wd"),
                                          ("--manualseed", "--manualSeed"), ("-rounds", "--rounds")])
def test_a_mistyped_flag_suggests_the_closest_one(cli, capsys, typed, meant):
    one_error(capsys, cli("-d", "digits", typed, "3"),
              f"unrecognized arguments: {typed} 3; did you mean {meant}? (see --help)")


def test_an_unknown_flag_far_from_every_option_gets_no_suggestion(cli, capsys):
    line = one_error(capsys, cli("-d", "digits", "--zzzzzz"))
    assert line == "error: train_linear.py: unrecognized arguments: --zzzzzz (see --help)"


def test_a_missing_recipe_names_the_installations_recipes_folder(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the installation's folder: recipes/ is not here
    line = one_error(capsys, cli("--config", "recipes/digit.yaml"))
    recipes = ROOT / "recipes"
    assert line == (f"error: recipe file not found: recipes/digit.yaml (read from {tmp_path}); the recipes "
                    f"of this installation are in {recipes}/; did you mean {recipes / 'digits.yaml'}?")
