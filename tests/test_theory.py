"""The theory model (utils/theory.py) and its command line (numerical_solving.py).

Every check compares against an independent computation: the closed form against the linear
solve, the softmax fixed point against its own equation and against a probe trained on features,
the theory's round t* against where the solved accuracies reach 100%. Sizes are tiny (N <= 600).
"""
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import numerical_solving
from utils import theory as th
from utils import theory_outputs as tho
from utils.cli import UserError, run_main
from utils.options import Interval

F64 = torch.float64


def problem(**kw):
    s = th.Setting(**{**dict(k=3, n=10, lbd=1e-2, c=0.4, d=0.1, eta=0.4, epsilon=0.0), **kw})
    return th.build_problem(s, "cpu", F64)


def solve(*argv):
    """The command as a user runs it (exit code; printout to capsys)."""
    return run_main(numerical_solving.main, [str(a) for a in argv])


def cli(tmp_path, *argv):
    return solve(*argv, "--out", tmp_path / "out")


def records_in(folder):
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------

def test_block_matrix_spectrum_matches_the_stated_eigenvalues():
    k, n, c, d = 3, 4, 0.5, 0.2
    w = torch.linalg.eigvalsh(th.block_matrix(k, n, c, d))
    expected = []
    for g, mult in th.block_spectrum(k, n, c, d).values():
        expected += [g] * mult
    assert torch.allclose(w, torch.tensor(sorted(expected), dtype=F64), atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_exact_label_noise_has_the_population_frequencies(eta):
    true = th.true_classes(4, 30)
    given = th.noisy_labels(true, 4, eta, th.generator(0), exact=True)
    for cls in range(4):
        got = given[true == cls]
        assert (got != cls).sum().item() == round(eta * 30)
        others = torch.bincount(got[got != cls], minlength=4)
        others = others[torch.arange(4) != cls]
        assert others.max() - others.min() <= 1          # spread evenly over the other classes


def test_sampled_labels_never_keep_a_flipped_class_and_follow_the_seed():
    true = th.true_classes(5, 200)
    a = th.noisy_labels(true, 5, 0.5, th.generator(3))
    b = th.noisy_labels(true, 5, 0.5, th.generator(3))
    assert torch.equal(a, b)
    assert abs((a != true).double().mean().item() - 0.5) < 0.06


def test_feature_gram_is_the_gram_matrix_of_its_features_with_unit_diagonal():
    G, Phi = th.feature_gram(3, 20, 0.4, 0.1, 0.05, th.generator(0))
    assert torch.allclose(G, Phi.T @ Phi)
    assert torch.allclose(G.diagonal(), torch.ones(60, dtype=F64))
    # epsilon = 0: exactly the block matrix
    G0, _ = th.feature_gram(3, 20, 0.4, 0.1, 0.0, th.generator(0))
    assert torch.allclose(G0, th.block_matrix(3, 20, 0.4, 0.1), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------

def test_diagnostics_flag_an_indefinite_original_matrix_and_pass_the_gram_variants():
    s = dict(k=4, n=150, epsilon=0.1)
    bad = problem(**s).diagnostics
    assert not bad["symmetric"] and not bad["psd"] and not bad["gram"]
    assert bad["min_eig_sym"] < -0.1
    assert any("NOT a Gram matrix" in line for line in th.describe_diagnostics(bad))
    for gram in ("psd", "features"):
        good = problem(gram=gram, **s).diagnostics
        assert good["symmetric"] and good["psd"] and good["gram"], gram
        assert any("unique" in line for line in th.describe_diagnostics(good))


def test_diagnostics_flag_a_symmetric_indefinite_matrix():
    G = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)          # eigenvalues 3 and -1
    diag = th.gram_diagnostics(G)
    assert diag["symmetric"] and not diag["psd"] and diag["min_eig_sym"] == pytest.approx(-1.0)
    assert diag["min_real_eig"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------------
# Solvers against independent references
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lbd", [1e-2, 1e-4, 1e-5])
def test_closed_form_equals_the_exact_linear_solve(lbd):
    p = problem(k=4, n=15, lbd=lbd, eta=0.5)
    s = p.setting
    solves = th.linear_rounds(p.kernel, p.T0, s.lbd, rounds=6)
    for t, sol in enumerate(solves, start=1):
        Ycf = th.closed_form_outputs(p.T0, p.true, s.k, s.n, s.c, s.d, s.lbd, t)
        assert (sol.Y - Ycf).abs().max().item() < 1e-8, t
        assert sol.residual < 1e-10 and sol.converged


def test_linear_solve_matches_the_iterated_matrix_equation():
    p = problem(epsilon=0.05)           # a noisy, non-symmetric G: no closed form, plain algebra
    K, N = p.T0.shape
    S = p.kernel.G / (K * N * p.setting.lbd)
    inv = torch.linalg.inv(torch.eye(N, dtype=F64) + S)
    Y = p.T0
    for sol in th.linear_rounds(p.kernel, p.T0, p.setting.lbd, rounds=3):
        Y = (1.0 / K + Y @ S) @ inv
        assert torch.allclose(sol.Y, Y, atol=1e-10)


def test_linear_rounds_on_an_indefinite_matrix_amplify_and_say_so():
    p = problem(k=4, n=150, lbd=1e-5, epsilon=0.1, eta=0.5)
    assert p.diagnostics["min_real_eig"] < -p.setting.k * p.setting.N * p.setting.lbd / 2
    solves = th.linear_rounds(p.kernel, p.T0, p.setting.lbd, rounds=4)
    sizes = [sol.Y.abs().max().item() for sol in solves]
    assert sizes[-1] > 10 * sizes[0] > 10
    assert "grow" in solves[-1].note and all(sol.converged for sol in solves)


@pytest.mark.parametrize("kw", [
    dict(k=4, n=50, lbd=1e-5, epsilon=0.05, eta=0.5),                     # the defaults' stiffness, small N
    dict(k=3, n=40, lbd=1e-4, epsilon=0.1, eta=0.3, gram="features"),
    dict(k=2, n=30, lbd=1e-3, epsilon=0.05, eta=0.2, gram="psd"),
], ids=["original-stiff", "features", "psd-k2"])
def test_exact_softmax_solution_satisfies_the_fixed_point(kw):
    p = problem(**kw)
    rounds = list(th.run_rounds(p, solver="exact", approx=False, rounds=3, tol=1e-10))
    T = p.T0
    for r in rounds[1:]:
        assert r["converged"], r["note"]
        Y = r["Y"]
        # recomputed here, not taken from the solver
        Z = (T - Y) @ p.kernel.G / (p.setting.N * p.setting.lbd)
        assert (Y - torch.softmax(Z, dim=0)).abs().max().item() <= 1e-10
        assert torch.allclose(Y.sum(0), torch.ones(p.setting.N, dtype=F64))
        T = Y


def train_probe(Phi, T, lbd):
    """The linear softmax model trained to convergence (full batch, LBFGS, float64):
    min_W mean_i CE(softmax(W phi_i), t_i) + lambda/2 ||W||^2."""
    K, N = T.shape
    W = torch.zeros(K, Phi.shape[0], dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=5000, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(W @ Phi, dim=0)
        loss = -(T * logp).sum() / N + 0.5 * lbd * (W ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.softmax(W.detach() @ Phi, dim=0)


@pytest.mark.parametrize("gram,lbd", [("features", 1e-2), ("psd", 3e-3)])
def test_on_a_gram_matrix_the_fixed_point_is_the_trained_probe(gram, lbd):
    p = problem(k=3, n=10, lbd=lbd, epsilon=0.1, eta=0.4, gram=gram)
    assert p.diagnostics["gram"]
    Phi = p.kernel.factor
    assert torch.allclose(Phi.T @ Phi, p.kernel.G, atol=1e-12)
    T = p.T0
    for r in list(th.run_rounds(p, solver="exact", approx=False, rounds=2))[1:]:
        probe = train_probe(Phi, T, lbd)
        assert (r["Y"] - probe).abs().max().item() < 1e-6, r["round"]
        T = r["Y"]


def test_faithful_adam_follows_the_original_recipe_step_by_step():
    """A plain re-statement of SPEC 3 (random column-normalised start, Adam on ||Y - F(Y)||^2 with
    lr 1e-2 linear / 1e-3 softmax, clamp at 1e-6 and renormalise after each step)."""
    p = problem(k=3, n=5, lbd=1e-3, epsilon=0.2)
    K, N = p.T0.shape
    for approx, lr in ((True, 1e-2), (False, 1e-3)):
        gen = th.generator(7)
        got = th.faithful_adam(p.kernel, p.T0, p.setting.lbd, approx=approx, max_iter=300, gen=gen)
        gen = th.generator(7)
        Y = torch.rand(K, N, generator=gen, dtype=F64)
        Y = (Y / Y.sum(0)).requires_grad_(True)
        opt = torch.optim.Adam([Y], lr=lr)
        for _ in range(300):
            Z = (p.T0 - Y) @ p.kernel.G / (N * p.setting.lbd)
            F = 1 / K + Z / K if approx else torch.softmax(Z, 0)
            opt.zero_grad()
            ((Y - F) ** 2).sum().backward()
            opt.step()
            with torch.no_grad():
                Y.clamp_(min=1e-6)
                Y /= Y.sum(0)
        assert torch.allclose(got.Y, Y.detach(), atol=1e-12, rtol=0), approx
        assert got.iterations == 300 and not got.converged
        if approx:   # the clamp was active: the exact linear solution has negative entries here
            assert (th.linear_rounds(p.kernel, p.T0, p.setting.lbd, 1)[0].Y < 0).any()
            assert (got.Y < 2e-6).any()


def test_faithful_adam_in_linear_mode_approaches_the_exact_solution():
    p = problem(k=3, n=4, lbd=0.05)       # large lambda: positive solution, the projection is inactive
    exact = th.linear_rounds(p.kernel, p.T0, p.setting.lbd, rounds=1)[0].Y
    sol = th.faithful_adam(p.kernel, p.T0, p.setting.lbd, approx=True, max_iter=20000, gen=th.generator(0))
    assert sol.converged and sol.iterations < 20000
    assert (sol.Y - exact).abs().max().item() < 1e-2


# ----------------------------------------------------------------------------------------------
# Theory: the round of 100% accuracy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,eta,lbd", [(3, 30, 0.4, 9.5e-4), (4, 30, 0.3, 2e-4), (2, 40, 0.25, 3e-3)])
def test_theory_round_of_perfect_accuracy_matches_the_solved_rounds(k, n, eta, lbd):
    p = problem(k=k, n=n, eta=eta, lbd=lbd, labels="exact")
    info = th.theory_rounds_to_perfect(k, n, p.setting.c, p.setting.d, lbd, eta)
    t_star = info["t_star"]
    assert t_star is not None and 2 <= t_star <= 25
    solves = th.linear_rounds(p.kernel, p.T0, lbd, rounds=t_star + 3)
    overall = [th.accuracies(sol.Y, p.true, p.given)["overall"] for sol in solves]
    assert th.first_perfect_round(overall) == t_star
    assert all(a == 100.0 for a in overall[t_star - 1:])           # and it stays there
    clean = [th.accuracies(sol.Y, p.true, p.given)["clean"] for sol in solves]
    assert all(a == 100.0 for a in clean)                           # clean samples are never lost


def test_theory_says_no_when_the_true_class_is_not_the_majority():
    info = th.theory_rounds_to_perfect(4, 100, 0.4, 0.1, 1e-4, 0.8)
    assert info["t_star"] is None and "most frequent" in info["reason"]
    assert th.theory_rounds_to_perfect(4, 100, 0.4, 0.1, 1e-4, 0.0)["t_star"] == 0


def test_defaults_theory_numbers():
    info = th.theory_rounds_to_perfect(4, 500, 0.4, 0.1, 1e-5, 0.5)
    assert info["mu"]["small"] == pytest.approx(7.5 / 8.5)
    assert info["threshold"] == pytest.approx(4.0)
    assert info["t_star"] == 12


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("words,expected", [([], False), (["--approx"], True), (["--approx", "True"], True),
                                            (["--approx", "False"], False), (["--approx", "0"], False)])
def test_approx_flag_parses_bare_and_words(words, expected):
    assert numerical_solving.build_parser().parse_args(words).approx is expected


def test_option_table_defaults_are_the_contract():
    a = numerical_solving.build_parser().parse_args([])
    assert (a.k, a.n, a.lbd, a.c, a.d, a.eta, a.epsilon, a.max_dist, a.max_iter, a.approx) == \
        (4, 500, 1e-5, 0.4, 0.1, 0.5, 0.05, 10, 100000, False)


def another_value(opt):
    """An allowed value of a setting other than its default."""
    if opt.choices:
        return next(choice for choice in opt.choices if choice != opt.default)
    return opt.default + 1 if opt.type is int else opt.default / 2


ROUND = {"round": 1, "acc": {"clean": 1.0, "noisy": 2.0, "overall": 3.0},
         "cf_acc": {"clean": 4.0, "noisy": 5.0, "overall": 6.0}, "cf_gap": 0.5, "residual": 1e-11,
         "iterations": 3, "work": 9, "folds": None, "converged": True, "seconds": 0.25}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(th.Setting)])
def test_every_setting_reaches_the_parser_checks_sweeps_names_and_records(name, monkeypatch):
    """Each field of theory.Setting is declared once, and every place derived from the declarations
    covers it: the parser reads it, it declares a constraint and the checks apply it, a sweep may
    vary it, the run's name and the record carry it (a field added without `option(...)` fails)."""
    opt = th.SETTING_OPTIONS.get(name)
    assert opt is not None, f"Setting.{name} is not declared with option(...)"
    value, default = another_value(opt), th.Setting()
    assert getattr(numerical_solving.build_parser().parse_args([f"{opt.flag}={value}"]), name) == value
    assert opt.valid is not None or opt.choices is not None, f"{opt.flag} declares no constraint"
    with monkeypatch.context() as patch, pytest.raises(UserError, match=re.escape(f"{opt.flag} must ")):
        nothing = Interval(int, 1, 0)  # no number lies in [1, 0]
        patch.setitem(th.SETTING_OPTIONS, name, dataclasses.replace(opt, valid=nothing, choices=None,
                                                                   type=str))
        numerical_solving.check_setting(default)          # the checks read the declaration
    assert name in numerical_solving.SWEEPABLE
    changed = dataclasses.replace(default, **{name: value})
    assert tho.run_tag(changed, "exact") != tho.run_tag(default, "exact")
    assert name in tho.RECORD_FIELDS and name in tho.CURVE_FIELDS
    assert tho.make_record(changed, "exact", False, ROUND, {})[name] == value


def test_records_lead_with_the_settings_in_their_declared_order():
    names = [f.name for f in dataclasses.fields(th.Setting)]
    assert tho.RECORD_FIELDS[:len(names) + 2] == [*names, "solver", "mode"]
    assert tho.run_tag(th.Setting(), "exact") == \
        "4_500_1e-05_0.4_0.1_0.5_0.05_seed0_original_sampled_exact_softmax"


def test_help_shows_every_option_with_its_help_default_and_choices(capsys):
    parser = numerical_solving.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    body = text[text.index("options: -h, --help"):]
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    starts = []
    for action in actions:          # where each option's entry starts, in order
        starts.append(body.index(action.option_strings[0] + " ", starts[-1] + 1 if starts else 0))
    for action, start, end in zip(actions, starts, starts[1:] + [len(body)]):
        entry = body[start:end]
        assert action.help, action.option_strings
        if action.default not in (None, []):          # a default the help text states itself in words
            shown = "(default: " if "(default: " in action.help else f"(default: {action.default})"
            assert shown in entry, entry
        if action.choices:
            assert "{" + ",".join(action.choices) + "}" in entry, entry
    for needle in ("--k K number of classes K (default: 4)", "--gram {original,psd,features}",
                   "--lbd LBD weight decay lambda > 0 (default: 1e-05)", "--approx [BOOL]", "--sweep KEY=V1"):
        assert needle in body, needle


def docs_option_rows() -> dict:
    """{option strings: default} of the two option tables of docs/numerical_solving.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "numerical_solving.md").read_text()
    section = text[text.index("### Options"):text.index("Every setting of the model")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("Option", "---"):
            continue
        names = tuple(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", cells[0]))
        assert names and names not in rows, line
        rows[names] = cells[1].strip("`")
    return rows


def test_docs_option_tables_list_the_parser_options_and_defaults():
    actions = {tuple(a.option_strings): a for a in numerical_solving.build_parser()._actions
               if a.option_strings and a.dest != "help"}
    rows = docs_option_rows()
    assert set(rows) == set(actions), set(rows) ^ set(actions)
    for names, shown in rows.items():
        default = actions[names].default
        if default in (None, []):
            assert shown in ("-", "derived"), names
        elif isinstance(default, float):
            assert float(shown) == default, names
        else:
            assert shown == str(default), names


BAD = {
    "k<2": (["--k", "1"], "--k"),
    "n<1": (["--n", "0"], "--n"),
    "lambda=0": (["--lbd", "0"], "--lbd"),
    "lambda<0": (["--lbd", "-1e-3"], "--lbd"),
    "eta>1": (["--eta", "1.2"], "--eta"),
    "eta<0": (["--eta", "-0.1"], "--eta"),
    "epsilon<0": (["--epsilon", "-0.01"], "--epsilon"),
    "epsilon>1": (["--epsilon", "3"], "--epsilon"),
    "|c|>1": (["--c", "1.5"], "--c"),
    "|d|>1": (["--d", "-2"], "--d"),
    "max_dist<1": (["--max_dist", "0"], "--max_dist"),
    "approx word": (["--approx", "maybe"], "--approx"),
    "not a number": (["--k", "four"], "--k"),
    "sweep key": (["--sweep", "foo=1,2"], "--sweep"),
    "sweep value": (["--sweep", "eta=0.1,1.5"], "--eta"),
    "features needs c>=d": (["--gram", "features", "--c", "0.1", "--d", "0.3"], "--gram features"),
}


@pytest.mark.parametrize("argv,needle", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, needle):
    assert cli(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_faithful_mode_reproduces_its_numbers_per_seed(tmp_path, capsys):
    argv = ["--solver", "faithful", "--k", "3", "--n", "8", "--max_dist", "2", "--max_iter", "30"]
    runs = {}
    for where, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert solve(*argv, "--seed", seed, "--out", tmp_path / where) == 0
        files = sorted((tmp_path / where / "softmax").glob("*.npz"))
        assert [f.name[-6:] for f in files] == ["_0.npz", "_1.npz", "_2.npz"]
        runs[where] = [np.load(f, allow_pickle=False)["Y"] for f in files]
    assert runs["a"][1].dtype == np.float32                  # the original's default dtype
    for ya, yb in zip(runs["a"], runs["b"]):
        assert np.array_equal(ya, yb)
    assert not np.array_equal(runs["a"][1], runs["c"][1])
    out = capsys.readouterr().out
    assert "Adam hit --max_iter 30" in out and "NOT converged" in out


def test_round_zero_is_the_given_labels_and_arrays_are_plain(tmp_path):
    assert cli(tmp_path, "--k", "3", "--n", "6", "--max_dist", "1", "--approx") == 0
    files = sorted((tmp_path / "out" / "linear").glob("*.npz"))
    z = np.load(files[0], allow_pickle=False)
    assert int(z["round"]) == 0
    assert np.array_equal(z["Y"], np.eye(3)[z["given_labels"]].T)
    assert np.array_equal(z["true_labels"], np.repeat(np.arange(3), 6))


def test_sweep_writes_one_record_per_setting_and_round_and_the_figure(tmp_path, capsys):
    rc = cli(tmp_path, "--k", "3", "--n", "8", "--max_dist", "2", "--gram", "features", "--epsilon", "0.1",
             "--lbd", "1e-3", "--sweep", "eta=0.2,0.4", "--sweep", "seed=0,1", "--name", "sw",
             "--save", "False")
    assert rc == 0
    folder = tmp_path / "out" / "sw"
    recs = records_in(folder)
    assert len(recs) == 4 * 3
    assert {(r["eta"], r["seed"]) for r in recs} == {(0.2, 0), (0.2, 1), (0.4, 0), (0.4, 1)}
    assert all(r["converged"] and r["residual"] <= 1e-10 for r in recs)
    assert len((folder / "records.csv").read_text().splitlines()) == 1 + 12
    for ext in ("png", "pdf"):
        assert (folder / f"figure.{ext}").stat().st_size > 1000
    assert not (tmp_path / "out" / "softmax").exists()          # --save False


def test_yaml_config_sets_options_and_sweep_and_flags_win(tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("name: g\noptions: {k: 3, n: 6, max_dist: 1, approx: true, epsilon: 0.0}\n"
                   "sweep: {eta: [0.1, 0.3]}\n")
    assert cli(tmp_path, "--config", cfg, "--n", "5", "--save", "False") == 0
    recs = records_in(tmp_path / "out" / "g")
    assert {r["n"] for r in recs} == {5} and {r["mode"] for r in recs} == {"linear"}
    assert sorted({r["eta"] for r in recs}) == [0.1, 0.3]


def test_printout_shows_theory_and_closed_form_beside_the_solution(tmp_path, capsys):
    assert cli(tmp_path, "--k", 3, "--n", 10, "--max_dist", 2, "--epsilon", 0.05, "--lbd", "1e-3") == 0
    out = capsys.readouterr().out
    assert "NOT a Gram matrix" in out and "t* =" in out
    assert "| noise-free formula   clean   noisy overall |" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(r.split("|")[0]) for r in rows] == [0, 1, 2]
    assert all(not math.isnan(float(r.split("|")[4])) for r in rows)


# ----------------------------------------------------------------------------------------------
# Command line: bad input is one line naming the fix (exit code 2), and nothing is written
# ----------------------------------------------------------------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


BAD_CONFIG = {
    "list for one value": ("options: {k: [2, 3]}\n", ["options.k", "expected one value", "[2, 3]"]),
    "options not a mapping": ("options: 5\n", ["options must be a mapping", "5"]),
    "sweep value wrong type": ("sweep: {k: [abc]}\n", ["sweep.k", "invalid int value: 'abc'"]),
    "sweep value a mapping": ("sweep: {k: {a: 1}}\n", ["sweep.k", "expected one value", "{'a': 1}"]),
    "sweep not a mapping": ("sweep: 5\n", ["sweep must be a mapping", "5"]),
    "option choice": ("options: {solver: bogus}\n", ["options.solver", "invalid choice: 'bogus'", "exact"]),
    "sweep int not integer": ("sweep: {k: 3.7}\n", ["sweep.k", "invalid int value: '3.7'"]),
    "option int not integer": ("options: {max_dist: 2.5}\n",
                               ["options.max_dist", "invalid int value: '2.5'"]),
    "sweep bool for float": ("sweep: {eta: [0.1, true]}\n", ["sweep.eta", "invalid float value: 'True'"]),
    "sweep bool for int": ("sweep: {seed: [false]}\n", ["sweep.seed", "invalid int value: 'False'"]),
    "option bool for float": ("options: {lbd: true}\n", ["options.lbd", "invalid float value: 'True'"]),
    "option without value": ("options: {k: }\n", ["options.k", "expected one value, got nothing"]),
    "sweep without values": ("sweep: {eta: []}\n", ["sweep.eta", "no values"]),
    "help is no option": ("options: {help: true}\n", ["unknown options ['help']"]),
    "duplicate key": ("options: {k: 3}\nsweep: {eta: [0.1]}\noptions: {k: 2}\n",
                      ["'options' is given twice", "line 3"]),
    "duplicate nested key": ("sweep:\n  eta: [0.1]\n  eta: [0.2]\n", ["'eta' is given twice", "line 3"]),
    "name escapes --out": ("name: ../evil\n", ["name '../evil'", "plain folder name"]),
    "options.name escapes": ("options: {name: a/b}\n", ["options.name 'a/b'", "plain folder name"]),
    "title not one value": ("title: [a, b]\n", ["title must be one value"]),
}


@pytest.mark.parametrize("text,needles", BAD_CONFIG.values(), ids=BAD_CONFIG.keys())
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert cli(tmp_path, "--config", cfg, "--k", "2", "--n", "3", "--max_dist", "1", "--approx") == 2
    line = one_error_line(capsys)
    assert f"--config {cfg}" in line
    for needle in needles:
        assert needle in line
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_config_options_are_read_as_the_command_line_reads_them(tmp_path):
    """YAML's '1e-3' is a string and 2 an int: both are read as --lbd=1e-3 and --c=... would be."""
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("name: ok+run-1.5\noptions: {k: 2, n: 3, max_dist: 1, approx: yes, lbd: 1e-3, c: 1, d: 0, "
                   "save: false, max_newton: 5}\nsweep: {eta: 0.25, gram: [features]}\n")
    assert cli(tmp_path, "--config", cfg) == 0
    recs = records_in(tmp_path / "out" / "ok+run-1.5")
    assert {(r["k"], r["n"], r["lbd"], r["c"], r["d"], r["eta"], r["gram"], r["mode"]) for r in recs} == \
        {(2, 3, 1e-3, 1.0, 0.0, 0.25, "features", "linear")}


@pytest.mark.parametrize("flag,value,message", [
    ("--lbd", "-1e-5", "--lbd must be > 0 (the weight decay, e.g. --lbd 1e-5), got -1e-05"),
    ("--epsilon", "-1e-3", "--epsilon must lie in [0, 1] (the noise level of G), got -0.001"),
    ("--eta", "-1E-9", "--eta must lie in [0, 1] (the corruption ratio), got -1e-09"),
    ("--c", "-1.5e0", "--c must lie in [-1, 1] (a correlation), got -1.5"),
    ("--d", "-2", "--d must lie in [-1, 1] (a correlation), got -2.0"),
    ("--tol", "-1e-10", "--tol must be > 0 (e.g. --tol 1e-10), got -1e-10"),
    ("--seed", "-1", "--seed must be >= 0, got -1"),
    ("--k", "-3", "--k must be >= 2 (number of classes), got -3"),
    ("--n", "-1", "--n must be >= 1 (samples per class), got -1"),
    ("--max_dist", "-1", "--max_dist must be an integer in [1, 1000] (distillation rounds), got -1"),
    ("--max_iter", "-5", "--max_iter must be an integer in [1, 100000000] (Adam steps), got -5"),
    ("--max-newton", "-1", "--max-newton must be >= 1, got -1"),
    ("--threads", "-2", "--threads must be >= 0 (0: one thread on the CPU), got -2"),
])
def test_negative_numbers_are_read_then_validated(tmp_path, capsys, flag, value, message):
    assert cli(tmp_path, flag, value) == 2
    assert one_error_line(capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_negative_numbers_in_any_notation_are_values_not_options():
    argv = ["--c", "-1e-1", "--d", "-.5", "--lbd", "-inf", "--eta", "-NaN"]
    a = numerical_solving.build_parser().parse_args(argv)
    assert (a.c, a.d, a.lbd) == (-0.1, -0.5, -math.inf) and math.isnan(a.eta)


@pytest.mark.parametrize("flag", ["--lbd", "--c", "--d", "--eta", "--epsilon", "--tol"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused(tmp_path, capsys, flag, value):
    assert cli(tmp_path, flag, value) == 2
    assert one_error_line(capsys) == f"error: {flag} must be a finite number, got {float(value)}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sweep,needle", [("eta=0.1,inf", "--eta must be a finite number, got inf"),
                                          ("k=3.7", "--sweep 'k=3.7': invalid int value: '3.7'"),
                                          ("gram=bogus", "--sweep 'gram=bogus': invalid choice: 'bogus'")])
def test_bad_sweep_values_on_the_command_line(tmp_path, capsys, sweep, needle):
    assert cli(tmp_path, "--sweep", sweep) == 2
    assert needle in one_error_line(capsys)


@pytest.mark.parametrize("name", ["../../x", "ABS", "a/b", "..", ".hidden", "a b"])
def test_name_is_a_plain_folder_under_out(tmp_path, capsys, name):
    root = tmp_path / "deep" / "er"
    root.mkdir(parents=True)
    name = str(tmp_path / "abs") if name == "ABS" else name       # an absolute path (stays inside tmp_path)
    rc = solve("--k", 2, "--n", 3, "--max_dist", 1, "--approx", "--name", name, "--out", root / "out")
    assert rc == 2
    assert one_error_line(capsys) == (f"error: --name {name!r} is not a plain folder name: use letters, "
                                      "digits, '_', '-', '.', '+' (no '/', not starting with '.'), "
                                      "e.g. --name my_sweep")
    assert [p for p in tmp_path.rglob("*")] == [tmp_path / "deep", root]        # nothing written anywhere


def test_config_name_cannot_escape_out(tmp_path, capsys):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("name: ../evil\noptions: {k: 2, n: 3, max_dist: 1, approx: true}\n")
    assert cli(tmp_path, "--config", cfg) == 2
    assert f"--config {cfg}: name '../evil' is not a plain folder name" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]


@pytest.mark.parametrize("save", ["True", "False"])
@pytest.mark.parametrize("under", ["file/out", "file"])
def test_out_under_a_regular_file_is_one_line_and_nothing_is_written(tmp_path, capsys, under, save):
    (tmp_path / "file").write_text("keep me\n")
    out = tmp_path / under
    rc = solve("--k", 2, "--n", 3, "--max_dist", 1, "--approx", "--save", save, "--out", out)
    assert rc == 2
    assert one_error_line(capsys) == (f"error: --out {out}: cannot write or read {tmp_path / 'file'}: "
                                      "Not a directory; a part of that path is a file, not a directory: "
                                      "choose another path")
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "keep me\n"


# ----------------------------------------------------------------------------------------------
# Output names: every setting that changes the numbers is in them, and nothing is overwritten
# silently
# ----------------------------------------------------------------------------------------------

SMALL = ["--k", "3", "--n", "6", "--lbd", "1e-3", "--max_dist", "1"]


def test_default_and_approx_write_to_different_folders(tmp_path):
    assert cli(tmp_path, *SMALL) == 0
    assert cli(tmp_path, *SMALL, "--approx") == 0
    out = tmp_path / "out"
    base = "3_6_0.001_0.4_0.1_0.5_0.05_seed0_original_sampled_exact"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{base}_linear", f"{base}_softmax", "linear",
                                                            "softmax"])
    for mode in ("softmax", "linear"):                   # each run kept its own records and figure
        recs = records_in(out / f"{base}_{mode}")
        assert {r["mode"] for r in recs} == {mode} and (out / f"{base}_{mode}" / "figure.png").exists()
        arrays = sorted(p.name for p in (out / mode).iterdir())
        assert arrays == [f"{base}_{mode}_0.npz", f"{base}_{mode}_1.npz"]


def test_names_carry_the_run_options_that_change_the_numbers():
    parse = numerical_solving.build_parser().parse_args
    s = th.Setting()

    def tag(*argv):
        a = parse(list(argv))
        mode = "linear" if a.approx else "softmax"
        dtype = th.resolve_dtype(a.dtype, a.solver)
        return tho.run_tag(s, a.solver, mode, numerical_solving.options_tag(a, dtype, a.approx))

    base = "4_500_1e-05_0.4_0.1_0.5_0.05_seed0_original_sampled"
    assert tag() == tag("--dtype", "float64") == f"{base}_exact_softmax"
    assert tag("--approx", "--max-newton", "5") == f"{base}_exact_linear"          # unused in linear mode
    assert tag("--tol", "1e-8", "--max-newton", "5") == f"{base}_exact_softmax_tol1e-08_newton5"
    assert tag("--solver", "faithful") == f"{base}_faithful_softmax_iter100000"
    assert tag("--solver", "faithful", "--max_iter", "30", "--dtype", "float64") == \
        f"{base}_faithful_softmax_iter30_float64"


def test_sweep_folder_names_include_mode_and_variant(tmp_path):
    sweep = ["--sweep", "eta=0.1,0.3", "--save", "False", "--epsilon", "0.1"]
    assert cli(tmp_path, *SMALL, *sweep, "--gram", "features", "--approx") == 0
    assert cli(tmp_path, *SMALL, *sweep, "--gram", "features") == 0
    assert cli(tmp_path, *SMALL, "--sweep", "gram=psd,features", "--sweep", "seed=0,1",
               "--save", "False") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "sweep_eta_3_6_0.001_0.4_0.1_0.1+0.3_0.1_seed0_features_sampled_exact_linear",
        "sweep_eta_3_6_0.001_0.4_0.1_0.1+0.3_0.1_seed0_features_sampled_exact_softmax",
        "sweep_gram_seed_3_6_0.001_0.4_0.1_0.5_0.05_seed0+1_psd+features_sampled_exact_softmax"]
    settings = [th.Setting(eta=e / 1000) for e in range(100)]
    long = numerical_solving.sweep_name(settings, {"eta": [s.eta for s in settings]}, "exact", "softmax", "")
    assert len(long) <= numerical_solving.MAX_NAME and "_100values-" in long
    assert long.endswith("_exact_softmax")


def test_the_recipe_folder_is_derived_from_its_settings():
    parser = numerical_solving.build_parser()
    options, grid, named = numerical_solving.load_config("recipes/theory/eta.yaml", parser)
    assert named["name"] is None and options["gram"] == "features" and grid == {"eta": [0.1, 0.3, 0.5, 0.7]}
    settings = [th.Setting(gram="features", eta=eta) for eta in grid["eta"]]
    assert numerical_solving.sweep_name(settings, grid, "exact", "softmax", "") == \
        "sweep_eta_4_500_1e-05_0.4_0.1_0.1+0.3+0.5+0.7_0.05_seed0_features_sampled_exact_softmax"


def test_a_rerun_into_an_existing_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    argv = [*SMALL, "--approx", "--max_dist", "3"]
    assert cli(tmp_path, *argv) == 0
    out = tmp_path / "out"
    folder = out / "3_6_0.001_0.4_0.1_0.5_0.05_seed0_original_sampled_exact_linear"
    before = {p: p.read_bytes() for p in [*folder.iterdir(), *(out / "linear").iterdir()]}
    capsys.readouterr()
    assert cli(tmp_path, *argv) == 2                                   # the same run again: refused
    line = one_error_line(capsys)
    assert (f"{folder} already holds an earlier run's records.csv, records.jsonl, figure.png, "
            "figure.pdf") in line
    assert f"4 arrays of the same settings already exist in {out / 'linear'}" in line
    assert ("pass --overwrite to replace them, or --name NAME --save False to write the new run "
            "elsewhere") in line
    assert cli(tmp_path, *argv, "--name", "mine") == 2                 # the arrays would still collide
    assert "--save False to write only the records" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in before} == before and not (out / "mine").exists()
    assert cli(tmp_path, *argv, "--name", "mine", "--save", "False") == 0
    assert (out / "mine" / "records.csv").exists()
    # --overwrite with fewer rounds: records replaced, the earlier run's extra arrays removed
    assert cli(tmp_path, *SMALL, "--approx", "--overwrite") == 0
    assert len((folder / "records.csv").read_text().splitlines()) == 1 + 2
    assert sorted(p.name[-6:] for p in (out / "linear").iterdir()) == ["_0.npz", "_1.npz"]


# ----------------------------------------------------------------------------------------------
# --approx: the tolerance is relative, and divergence is the headline
# ----------------------------------------------------------------------------------------------

def test_round_growth_is_the_largest_shrink_factor_of_the_round_map():
    K, N, lbd = 2, 40, 1e-2
    knl = K * N * lbd                                          # s = g / knl; |s/(1+s)| > 1 iff g < -knl/2
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=th.generator(1), dtype=F64))
    for g_min, diverges in ((0.2 * knl, False), (-0.3 * knl, False), (-0.55 * knl, True), (-0.8 * knl, True)):
        g = torch.linspace(1.0, 5.0, N, dtype=F64)
        g[0] = g_min
        kernel = th.Kernel(Q @ torch.diag(g) @ Q.T)
        T0 = th.one_hot(torch.arange(N) % K, K)
        sol = th.linear_rounds(kernel, T0, lbd, rounds=3)
        mu = (g / knl) / (1 + g / knl)
        assert sol[0].growth == pytest.approx(mu.abs().max().item(), rel=0.05), g_min
        assert (sol[0].growth > 1) == diverges and ("grow" in sol[0].note) == diverges


def test_approx_on_the_original_matrix_headlines_the_divergence(tmp_path, capsys):
    # the option table's defaults
    assert cli(tmp_path, "--approx", "--max_dist", "3", "--save", "False") == 0
    out = capsys.readouterr().out
    assert "every round reached its tolerance" not in out
    assert "DIVERGED: the rounds' outputs grow without bound" in out and "x9.2 a round" in out
    assert "relative to the largest output" in out and "but the rounds DIVERGE" in out
    assert "\n1 setting in " in out and "1 of them DIVERGED" in out
    lines = out.splitlines()
    headline = lines.index(next(x for x in lines if x.startswith("DIVERGED")))
    assert headline < lines.index(next(x for x in lines if x.startswith("solved 3 rounds")))   # comes first


def test_approx_on_a_gram_matrix_converges_and_says_what_the_tolerance_is(tmp_path, capsys):
    assert cli(tmp_path, "--approx", "--gram", "features", "--n", "250", "--max_dist", "3",
               "--save", "False") == 0
    out = capsys.readouterr().out
    assert "DIVERGED" not in out and "grow" not in out
    assert "every round reached its tolerance (max|Y - F(Y)| <= 1e-10 x max(1, max|Y|), relative to the " \
           "largest output" in out


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,threads", [([], 1), (["--threads", "2"], 2),
                                          (["--solver", "faithful", "--max_iter", "3"], 0)],
                         ids=["exact-default", "threads-2", "faithful-default"])
def test_cpu_solve_uses_one_thread_unless_told_and_restores_the_count(tmp_path, capsys, monkeypatch, flag,
                                                                      threads):
    """The exact solver runs on one CPU thread by default; the faithful one keeps torch's count (0 here)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return {info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}

    seen, diagnostics = [], th.gram_diagnostics
    monkeypatch.setattr(th, "gram_diagnostics",
                        lambda G: seen.append((torch.get_num_threads(), blas_threads())) or diagnostics(G))
    before = (torch.get_num_threads(), blas_threads())
    assert cli(tmp_path, *SMALL, "--approx", "--device", "cpu", "--save", "False", *flag) == 0
    expected = (threads, {threads}) if threads else before   # torch and scipy's BLAS (G's diagnostics) alike
    assert f" on cpu, {expected[0]} thread{'s' if expected[0] > 1 else ''}\n" in capsys.readouterr().out
    assert seen == [expected]
    assert (torch.get_num_threads(), blas_threads()) == before


def test_theory_figure_draws_the_closed_form_as_points_and_keeps_the_legend_off_the_data():
    from utils.theory_outputs import theory_figure
    base = {name: 0 for name in tho.RECORD_FIELDS}
    records = [{**base, "round": t, "clean": 90.0 + t, "noisy": 10.0 * t, "cf_clean": 91.0,
                "cf_noisy": 12.0 * t} for t in range(4)]
    fig = theory_figure(records, [], "title")
    for ax in fig.axes:
        solved, closed = ax.get_lines()
        assert solved.get_linestyle() == "-"
        assert closed.get_linestyle() == "None" and closed.get_marker() == "x"
    legend = fig.axes[1].get_legend()
    fig.canvas.draw()
    box = legend.get_window_extent().transformed(fig.axes[1].transAxes.inverted())
    assert box.x0 >= 1.0  # to the right of the axes: on no data


# ----------------------------------------------------------------------------------------------
# What a first run says before its numbers, and what its figure says
# ----------------------------------------------------------------------------------------------

def test_the_first_lines_say_what_to_expect_and_where_the_effect_shows(tmp_path, capsys):
    """Here (as at the option table's defaults) the formula corrects the noisy samples only beyond
    --max_dist and G is no Gram matrix: the lines after the setting say both, and name --gram features."""
    assert cli(tmp_path, "--k", 3, "--n", 10, "--max_dist", 2, "--epsilon", 0.05, "--lbd", "1e-3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("setting: K=3 n=10 ")
    assert lines[2:4] == [
        "expect: noise-free formula columns (the paper's closed form: the block matrix without noise, linear "
        "approximation): the noisy samples are corrected only from step t* = 14, beyond --max_dist 2: until "
        "then its columns stay near the given labels' clean 100%, noisy 0%",
        "expect: this G is not a Gram matrix (no features have it), so the solved steps need not average the "
        "labels as the paper describes; --gram features (a Gram matrix of features with the same block "
        "means) shows the paper's effect: noisy samples corrected step by step"]
    assert cli(tmp_path, "--k", 3, "--n", 10, "--max_dist", 20, "--lbd", "1e-3", "--gram", "features",
               "--approx", "--save", "False") == 0
    expect = [line for line in capsys.readouterr().out.splitlines() if line.startswith("expect:")]
    assert expect == ["expect: noise-free formula columns (the paper's closed form: the block matrix without "
                      "noise, linear approximation): every noisy sample is corrected from step t* = 14, "
                      "within these 20 steps"]


def test_a_single_setting_figure_names_the_model_settings_in_its_title():
    import argparse
    run = numerical_solving.Run(argparse.Namespace(solver="exact"), torch.device("cpu"), torch.float64,
                                "softmax")
    s = th.Setting()
    assert numerical_solving.figure_title(run, [s], [], None) == (
        "exact solver, softmax mode, gram=original\n"
        "K=4, n=500, c=0.4, d=0.1, eta=0.5, lambda=1e-05, epsilon=0.05")
    assert numerical_solving.figure_title(run, [s], ["eta"], None).endswith("lambda=1e-05, epsilon=0.05")
    assert "eta=" not in numerical_solving.figure_title(run, [s], ["eta"], None)
    assert numerical_solving.figure_title(run, [s], ["eta"], "Title") == \
        "Title\n(exact solver, softmax mode, gram=original)"


def test_the_formulas_crosses_of_a_sweep_do_not_hide_each_other():
    """Equal formula values (here every setting's) are drawn side by side, each setting's crosses
    shifted by its own amount; the solved dots stay on the whole steps; the legend says what each is."""
    base = {name: 0 for name in tho.RECORD_FIELDS}
    records = [{**base, "eta": eta, "round": t, "cf_clean": 100.0, "cf_noisy": 0.0}
               for eta in (0.1, 0.3, 0.5) for t in range(3)]
    fig = tho.theory_figure(records, ["eta"], "title")
    crosses = [line for line in fig.axes[1].get_lines() if line.get_marker() == "x"]
    dots = [line for line in fig.axes[1].get_lines() if line.get_marker() == "o"]
    shifts = np.asarray([np.asarray(line.get_xdata()) - np.arange(3) for line in crosses])
    assert tho.CROSS_SHIFT >= 0.1
    assert shifts == pytest.approx(np.array([[-1.0], [0.0], [1.0]]) * tho.CROSS_SHIFT * np.ones(3))
    assert all(list(line.get_xdata()) == [0, 1, 2] for line in dots)
    assert fig.axes[1].get_legend().get_title().get_text() == (
        "dots: solved fixed point\ncrosses: formula of the\nnoise-free block model")
