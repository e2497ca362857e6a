"""The Step type (utils/steps.py): codes, labels, teachers, order and seeds."""
import numpy as np
import pytest

from utils.steps import SeedPurpose, Step, chain_steps, step_of


def test_codes_labels_teachers_and_order():
    steps = chain_steps(3)
    assert [str(s) for s in steps] == ["0", "1", "2", "3", "p"]
    assert [s.label for s in steps] == ["1 (Teacher)", "2", "3", "4", "PLL"]
    assert [s.kind for s in steps] == ["teacher", "student", "student", "student", "pll"]
    assert [str(s.learns_from) for s in steps[1:]] == ["0", "1", "2", "0"]
    assert sorted(reversed(steps), key=Step.sort_key) == steps
    assert [str(s) for s in chain_steps(0, partial=False)] == ["0"]
    assert step_of("p") == Step.pll() and step_of(Step.teacher()) == Step("0")
    with pytest.raises(ValueError):
        Step.teacher().learns_from
    for bad in ("", "01", "-1", "q", "1.0"):
        with pytest.raises(ValueError):
            Step(bad)


def test_seeds_are_the_stored_runs_streams():
    """The seeds of existing stores: SeedSequence([seed, round (PLL: 1000), purpose]); the two
    purposes and the steps give distinct streams."""
    def expected(seed, number, purpose):
        return int(np.random.SeedSequence([seed, number, purpose]).generate_state(1)[0])
    assert Step("3").seed(7, SeedPurpose.ORDER) == expected(7, 3, 1)
    assert Step.pll().seed(0, SeedPurpose.INIT) == expected(0, 1000, 0)
    seeds = {s.seed(0, p) for s in chain_steps(4) for p in SeedPurpose}
    assert len(seeds) == 2 * 6


def test_every_output_names_a_step_as_the_tables_do(cli, capsys, tmp_path, monkeypatch):
    """One name per step, the paper's numbering (`Step.label`: step 1 is the teacher, step t + 1 the
    student of round t), in the progress lines, the chain's table, the report's tables and figure
    legends, the claims, the teacher-missing error and the theory figure."""
    import json

    import matplotlib
    import utils.report
    from conftest import DIGITS, stderr_error_lines
    from utils.claims_report import write_claims
    from utils.theory_outputs import RECORD_FIELDS, theory_figure
    matplotlib.use("Agg")
    labels = [s.label for s in chain_steps(1)]
    assert labels == ["1 (Teacher)", "2", "PLL"]
    for seed in (0, 1, 2):
        assert cli(*DIGITS, "--rounds", 1, "--epochs", 3, "--manualSeed", seed) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if " trained in " in line] == \
        [f"step {label}" for label in labels] * 3
    assert [row[:11].strip() for row in out[out.rindex("step         best"):].splitlines()[2:5]] == labels
    legends, real = {}, utils.report.atomic_save_figure

    def keep_legend(fig, stem, **options):
        legends[stem.name] = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        return real(fig, stem, **options)
    monkeypatch.setattr(utils.report, "atomic_save_figure", keep_legend)
    grid = {"name": "t", "title": "T", "report": {"kind": "distillation", "gain_etas": [0.5]}}
    utils.report.write_reports(cli.records(), tmp_path / "report", grid, checkpoint_root=cli.dirs()["ckpt"])
    table = (tmp_path / "report" / "tables.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in table
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    assert rows == labels and legends["gain"] == labels[1:] and legends["curves"][:3] == labels
    write_claims(cli.records(), tmp_path / "report", "T", 1.0)
    compared = {e["comparison"] for e in json.loads((tmp_path / "report" / "claims.json").read_text())}
    assert "step 2 - teacher" in compared
    assert cli(*DIGITS, "--dist", 1, "--epochs", 3, "--manualSeed", 5) == 2  # its teacher never ran
    assert stderr_error_lines(capsys.readouterr().err)[0].startswith("error: step 1 (Teacher) of this")
    fig = theory_figure([{**dict.fromkeys(RECORD_FIELDS, 0), "round": t} for t in range(3)], [], "title")
    assert fig.axes[0].get_xlabel() == "step (0: the given labels, 1: the teacher)"
