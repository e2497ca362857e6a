"""The README's demo, full length (200 epochs per step): its numbers, within a tolerance that
absorbs float differences between CPUs. Slow (about 20 s): run with `pytest -m slow tests`."""
import pytest

from conftest import DIGITS

# README: step -> (best-by-test, last epoch, best-by-val) test accuracy, seed 0, eta 0.5.
README_TABLE = {"0": (90.83, 88.33, 89.72), "1": (90.56, 90.00, 87.78), "2": (89.17, 88.61, 87.50),
                "3": (86.11, 85.28, 85.56), "4": (84.17, 84.17, 80.28), "p": (85.00, 76.11, 85.00)}


@pytest.mark.slow
def test_demo_reproduces_the_readme_table(cli):
    assert cli(*DIGITS, "--rounds", 4, "--val-split", 0.1) == 0
    records = cli.by_step()
    assert set(records) == set(README_TABLE)
    for step, expected in README_TABLE.items():
        r = records[step]
        got = (r["test_acc_bytest"], r["test_acc_last"], r["test_acc_byval"])
        assert got == pytest.approx(expected, abs=1.0), (step, got, expected)
    assert records["0"]["realised_corruption"] == pytest.approx(50.12, abs=0.01)  # labels: numpy, exact
    assert records["p"]["teacher_top2_coverage"] == pytest.approx(96.8, abs=0.5)


def test_the_readme_demo_header_is_what_the_demo_command_prints():
    """The demo block's header line (checked without training: its settings part comes from the
    command line alone) lists the settings off their defaults, here --val-split."""
    import re
    from conftest import ROOT
    import train_linear
    from utils.settings import config_from_args, settings_text
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"&& python train_linear.py (.*)\n", readme).group(1).split()
    cfg = config_from_args(train_linear.build_parser().parse_args(command))
    header = next(line for line in readme.splitlines() if line.startswith("digits / pixels: "))
    assert header == f"digits / pixels: {settings_text(cfg)} on cpu; realised corruption 50.12%"
    assert settings_text(cfg).endswith(" val_split=0.1")
