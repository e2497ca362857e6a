"""The exact softmax solver (utils/softmax_solver.py): its preconditioner, its Krylov solves and
the weight-decay path.

Every check is against an independent computation: the Jacobian by autograd of the equation
itself, a brute-force path tracker with dense Jacobians and tiny fixed steps, the fixed-point
iteration where it is a contraction, Newton on a Gram matrix (whose fixed point is unique).
"""
import math

import pytest
import torch

from utils import softmax_solver as ss
from utils import theory as th

F64 = torch.float64

# small settings whose weight-decay path turns back twice in round 2 (found by a seed search; the
# brute-force tracker below confirms the folds). HAIRPIN's turn is so sharp that a step which cuts
# across it lands on the returning arm and then walks the branch backwards to beta = 0.
FOLDS = dict(k=3, n=10, lbd=1e-4, c=0.4, d=0.1, eta=0.4, epsilon=0.5, seed=5)
HAIRPIN = dict(k=3, n=20, lbd=3e-5, c=0.4, d=0.1, eta=0.4, epsilon=0.7, seed=4)


def problem(**kw):
    s = th.Setting(**{**dict(k=3, n=10, lbd=1e-3, c=0.4, d=0.1, eta=0.4, epsilon=0.3, seed=0), **kw})
    return th.build_problem(s, "cpu", F64)


def jacobian_by_autograd(G, P_logits_A, nl):
    """d/dA of nl A + softmax(A G) (K x N -> K x N), flattened row-major, by autograd."""
    K, N = P_logits_A.shape
    f = lambda A: (nl * A + torch.softmax(A @ G, dim=0)).reshape(-1)
    return torch.func.jacrev(f)(P_logits_A).reshape(K * N, K * N)


def random_state(G, K, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(K, G.shape[0], generator=gen, dtype=F64) * scale
    return A, torch.softmax(A @ G, dim=0)


# ----------------------------------------------------------------------------------------------
# The preconditioner
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.01, 0.3])          # mild and confident (saturated) outputs
def test_preconditioner_with_every_direction_strong_is_the_exact_inverse(scale):
    p = problem(n=20)
    G, K, nl = p.kernel.G, 3, 0.02
    A, P = random_state(G, K, scale)
    J = jacobian_by_autograd(G, A, nl)
    pre = ss.JacobianPreconditioner(G, ss.newton_basis(G, K), P, nl, strong=0.0)
    R = torch.randn(K * G.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    x = pre(R)
    assert (J @ x - R).norm() / R.norm() < 1e-10


def test_preconditioner_with_only_the_basis_inverts_the_jacobian_of_the_smoothed_matrix():
    """strong = inf: the weak-direction model G ~ sigma I + U C U^T everywhere (the preconditioner of
    the previous solver): exact for that matrix, not for G."""
    p = problem(n=20)
    G, K, nl = p.kernel.G, 3, 0.05
    basis = ss.newton_basis(G, K)
    G_smooth = basis.sigma * torch.eye(G.shape[0], dtype=F64) + basis.U @ basis.C @ basis.U.T
    A, P = random_state(G, K, 0.05)
    R = torch.randn(K * G.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    pre = ss.JacobianPreconditioner(G, basis, P, nl, strong=math.inf)
    assert pre.rank == 0
    J_smooth = jacobian_by_autograd(G_smooth, A @ G @ torch.linalg.inv(G_smooth), nl)   # same P, same M
    assert (J_smooth @ pre(R) - R).norm() / R.norm() < 1e-9
    assert (jacobian_by_autograd(G, A, nl) @ pre(R) - R).norm() / R.norm() > 1e-3


def test_split_preconditioner_inverts_its_split_operator_and_caps_its_rank():
    """Strong directions (w > strong nl) see G, weak ones sigma I + U C U^T; the operator is built
    here from the eigen-decomposition of each M_j, independently of the Woodbury formula."""
    p = problem(n=20)
    G, K, nl = p.kernel.G, 3, 0.02
    basis = ss.newton_basis(G, K)
    G_smooth = basis.sigma * torch.eye(G.shape[0], dtype=F64) + basis.U @ basis.C @ basis.U.T
    A, P = random_state(G, K, 1.0)                        # some samples confident, some not
    w, V = torch.linalg.eigh(torch.diag_embed(P.T) - P.T[:, :, None] * P.T[:, None, :])
    strong = w > 1.0 * nl
    M_strong = (V * torch.where(strong, w, 0)[:, None, :]) @ V.transpose(1, 2)
    M_weak = (V * torch.where(strong, 0, w)[:, None, :]) @ V.transpose(1, 2)

    def operator(X):
        return (nl * X + torch.einsum("jkl,lj->kj", M_strong, X @ G)
                + torch.einsum("jkl,lj->kj", M_weak, X @ G_smooth))

    pre = ss.JacobianPreconditioner(G, basis, P, nl, strong=1.0)
    assert 0 < pre.rank == int(strong.sum()) < (K - 1) * G.shape[0]
    R = torch.randn(K, G.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    X = pre(R.reshape(-1)).reshape(K, -1)
    assert (operator(X) - R).norm() / R.norm() < 1e-10
    capped = ss.JacobianPreconditioner(G, basis, P, nl, strong=1.0, max_rank=7)
    assert capped.rank == 7


def test_jacobian_solver_reaches_its_tolerance_and_reuses_its_preconditioner():
    p = problem(n=20)
    G, K, nl = p.kernel.G, 3, 0.02
    solver = ss.JacobianSolver(p.kernel, ss.newton_basis(G, K), strong=1.0, krylov_dtype=F64)
    A, P = random_state(G, K, 0.3)
    J = jacobian_by_autograd(G, A, nl)
    for seed in range(3):
        R = torch.randn(K, G.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
        X, rel = solver.solve(P, nl, R, 1e-10)
        assert rel <= 1e-10
        assert (J @ X.reshape(-1) - R.reshape(-1)).norm() / R.norm() < 1e-9
    assert solver.builds == 1             # the same P: one preconditioner serves every solve


def test_logits_are_the_product_up_to_a_constant_per_column_which_the_solver_never_sees():
    """Computed from K - 1 rows; the softmax, its Jacobian and the strong directions (orthogonal to
    1) give the same numbers as with X G itself."""
    p = problem(n=20)
    G, K = p.kernel.G, 3
    X = torch.randn(K, G.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
    Z, XG = ss.kernel_logits(p.kernel, X), X @ G
    shift = XG - Z
    assert (shift - shift[-1]).abs().max() < 1e-12 and shift[-1].abs().min() > 1e-3   # one constant a column
    A, P = random_state(G, K, 0.3)
    assert (torch.softmax(Z, 0) - torch.softmax(XG, 0)).abs().max() < 1e-13
    assert (ss.softmax_jac(P, Z) - ss.softmax_jac(P, XG)).abs().max() < 1e-13


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("N", [70, 71])
def test_blocked_product_is_the_product(rows, N):
    """G read in blocks of at most 13 whole rows: N = 70 in 7 blocks of 10, N = 71 (prime) in 5
    blocks of 13 and a remainder of 6."""
    G = torch.rand(N, N, generator=torch.Generator().manual_seed(0), dtype=F64)
    X = torch.randn(rows, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = ss.blocked_product(X, G, block_bytes=13 * N * 8)
    assert (got - X @ G).abs().max() < 1e-13


def test_step_length_aims_the_next_first_correction_at_half_its_limit():
    """The predictor errs by O(h^2): a first correction d at length h predicts (h'/h)^2 d at h'."""
    branch = ss._Branch(None, torch.zeros(3, 10), None, path_tol=1e-6, max_correction=0.02)
    for h, first in ((0.05, 0.003), (0.2, 0.004), (0.1, 0.002)):
        grown = branch.next_length(h, ss._Attempt(None, 0.0, ok=True, theta=0.01, first=first))
        predicted = first * (grown / h) ** 2
        assert predicted == pytest.approx(0.5 * branch.correction_limit(grown)) or grown == 2 * h
        assert h <= grown <= 2 * h
    too_far = ss._Attempt(None, 0.0, ok=False, iterations=1, first=0.05)      # failed: 0.05 > 0.02
    shorter = branch.next_length(0.2, too_far)
    assert 0.02 <= shorter <= 0.1
    assert 0.05 * (shorter / 0.2) ** 2 == pytest.approx(0.5 * branch.correction_limit(shorter))
    slow = ss._Attempt(None, 0.0, ok=True, theta=0.5, first=1e-6)            # contracted slowly
    assert branch.next_length(0.2, slow) == pytest.approx(0.1)


def test_subnormals_are_flushed_inside_the_block_only():
    tiny = torch.tensor([1e-40], dtype=torch.float32)       # subnormal in float32
    with ss.subnormals_flushed():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0.0


# ----------------------------------------------------------------------------------------------
# The weight-decay path
# ----------------------------------------------------------------------------------------------

def brute_force_branch(G, T, beta, beta0, h=0.02, max_steps=20000):
    """The same branch, tracked naively: pseudo-arclength in (B, log beta) with a fixed small step,
    the full Jacobian by autograd and dense solves, Newton correctors to 1e-13. Returns the final
    Y and the betas of the folds (where the path turns back in beta)."""
    K, N = T.shape
    n = K * N

    def H(x):
        B, mu = x[:n].reshape(K, N), x[n]
        return (B + torch.softmax(torch.exp(mu) * (B @ G), dim=0) - T).reshape(-1)

    def jac(x):
        return torch.func.jacrev(H)(x)                                  # n x (n + 1)

    def correct(x, border, target):
        for _ in range(30):
            J = jac(x)
            rows = torch.cat([J, border[None, :]], 0)
            rhs = torch.cat([-H(x), (target - border @ x).reshape(1)])
            dx = torch.linalg.solve(rows, rhs)
            x = x + dx
            if dx.abs().max() < 1e-13:
                return x
        raise AssertionError("brute-force corrector did not converge")

    mu0, mu_end = math.log(beta0), math.log(beta)
    x = torch.cat([(T - 1.0 / K).reshape(-1), torch.tensor([mu0], dtype=F64)])
    fix_mu = torch.zeros(n + 1, dtype=F64)
    fix_mu[n] = 1.0
    x = correct(x, fix_mu, mu0)
    t_prev, folds = None, []
    for _ in range(max_steps):
        J = jac(x)
        t = torch.linalg.svd(J).Vh[-1]                                  # null vector of H's Jacobian
        if t_prev is None:
            t = t if t[n] > 0 else -t
        elif t @ t_prev < 0:
            t = -t
        x_new = correct(x + h * t, t, t @ (x + h * t))
        if x_new[n] >= mu_end:
            a = (mu_end - x[n]) / (x_new[n] - x[n])
            x_end = correct(x + a * (x_new - x), fix_mu, mu_end)
            B = x_end[:n].reshape(K, N)
            return torch.softmax(beta * (B @ G), dim=0), folds
        if t_prev is not None and (t[n] > 0) != (t_prev[n] > 0):
            folds.append(math.exp(x_new[n].item()))
        x, t_prev = x_new, t
    raise AssertionError("brute-force tracker did not reach the target")


def path_solve(p, T, tol=1e-10, basis_seed=0, from_bound=True):
    """The path as the command follows it: from the uniqueness bound (`from_bound`, given the
    smallest eigenvalue of G's symmetric part), else from the contraction beta0. tol: 1e-10, the
    command's; at HAIRPIN's beta = 556 the float64 rounding floor of max|Y - F(Y)| is about 1e-11
    (the landing's Newton stalls at max|H| ~ 1e-13), so a tighter one passes or fails with the steps."""
    G, K = p.kernel.G, p.setting.k
    solver = ss.JacobianSolver(p.kernel, ss.newton_basis(G, K, seed=basis_seed), strong=1.0, krylov_dtype=F64)
    beta = 1.0 / (p.setting.N * p.setting.lbd)
    return ss.follow_weight_decay_path(p.kernel, T, beta, solver, tol=tol, gen=th.generator(0),
                                       min_eig_sym=p.diagnostics["min_eig_sym"] if from_bound else None)


def contraction_beta(p) -> float:
    """beta0 = 1/(2 |G|_2): where the fixed-point map is a contraction."""
    return 0.5 / ss.operator_norm(p.kernel, p.kernel.G.shape[0], th.generator(0))


def test_path_start_is_in_the_contraction_regime():
    """At beta0 = 1/(2 |G|_2) the fixed-point map is a contraction: plain iteration from any start
    reaches the path's starting point."""
    p = problem(n=15, epsilon=0.5)
    G, T = p.kernel.G, p.T0
    norm = ss.operator_norm(p.kernel, G.shape[0], th.generator(0))
    assert torch.linalg.matrix_norm(G, 2).item() <= norm <= 1.02 * torch.linalg.matrix_norm(G, 2).item()
    beta0 = 0.5 / norm
    solver = ss.JacobianSolver(p.kernel, ss.newton_basis(G, 3), strong=1.0, krylov_dtype=F64)
    start = ss.newton_at(p.kernel, T, T - 1 / 3, beta0, solver, 1e-13, 30)
    for seed in range(3):
        Y = torch.rand(T.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        Y = Y / Y.sum(0)
        for _ in range(60):
            Y = torch.softmax(beta0 * ((T - Y) @ G), dim=0)
        assert (Y - start.P).abs().max() < 1e-12


@pytest.mark.parametrize("setting", [FOLDS, HAIRPIN], ids=["folds", "hairpin"])
def test_path_lands_on_the_branch_a_brute_force_tracker_follows_through_its_folds(setting):
    """The preconditioner's basis (its random start) changes the inexact solves and so the steps
    taken; every such run must stay on the branch (at HAIRPIN two of these four walked it backwards
    before steps were checked against the first correction's size). The tracker starts at beta0,
    where the map is a contraction; the solver at the uniqueness bound, 10-20 times later: the
    same branch, since below the bound the fixed point is unique (`unique_below`)."""
    p = problem(**setting)
    T = path_solve(p, p.T0).P
    beta, beta0 = 1.0 / (p.setting.N * p.setting.lbd), contraction_beta(p)
    ref, fold_betas = brute_force_branch(p.kernel.G, T, beta, beta0)
    folds = len(fold_betas)
    assert min(fold_betas) > ss.unique_below(p.diagnostics["min_eig_sym"])    # none where it is unique
    for basis_seed in range(4 if setting is HAIRPIN else 1):
        got = path_solve(p, T, basis_seed=basis_seed)
        assert got.converged and got.residual <= 1e-10, got.note
        assert got.beta_start == pytest.approx(0.9 * 2 / -p.diagnostics["min_eig_sym"])
        assert got.beta_start > 10 * beta0
        assert folds >= 1 and got.folds == folds        # the branch really turns back, and as often
        assert (got.P - ref).abs().max() < 1e-8


def test_path_from_the_contraction_lands_where_the_path_from_the_bound_does():
    """The fallback start (no eigenvalue given, or Newton failing at the bound) finds the same
    fixed point, folds included."""
    p = problem(**FOLDS)
    T = path_solve(p, p.T0).P
    from_bound, from_beta0 = path_solve(p, T), path_solve(p, T, from_bound=False)
    assert from_beta0.beta_start == pytest.approx(contraction_beta(p))
    assert from_bound.converged and from_beta0.converged
    assert from_bound.folds == from_beta0.folds >= 1
    assert (from_bound.P - from_beta0.P).abs().max() < 1e-9


def test_path_result_depends_on_the_targets_only():
    """Not on warm starts or earlier rounds: the same T gives the same fixed point."""
    p = problem(**FOLDS)
    solvers = th.jacobian_solvers(p.kernel, 3, seed=0)
    kw = dict(gram=False, tol=1e-10, max_newton=60, gen=th.generator(0))
    a, _ = th.softmax_fixed_point(p.kernel, p.T0, p.setting.lbd, solvers, B0=None, **kw)
    b, _ = th.softmax_fixed_point(p.kernel, p.T0, p.setting.lbd, solvers, B0=torch.rand_like(p.T0), **kw)
    assert a.converged and b.converged
    assert (a.Y - b.Y).abs().max() < 1e-9


def test_on_a_gram_matrix_the_path_and_newton_find_the_one_fixed_point():
    p = problem(n=20, lbd=1e-4, epsilon=0.1, gram="features")
    assert p.diagnostics["gram"]
    solvers = th.jacobian_solvers(p.kernel, 3, seed=0)
    kw = dict(B0=None, tol=1e-10, max_newton=60, gen=th.generator(0))
    newton, _ = th.softmax_fixed_point(p.kernel, p.T0, p.setting.lbd, solvers, gram=True, **kw)
    path, _ = th.softmax_fixed_point(p.kernel, p.T0, p.setting.lbd, solvers, gram=False, **kw)
    assert newton.folds is None and path.folds == 0          # Newton answered; the path has no fold
    assert (newton.Y - path.Y).abs().max() < 1e-9


def test_rounds_report_the_path_and_its_folds(tmp_path, capsys):
    import numerical_solving
    from utils.cli import run_main

    argv = [f"--{k}={v}" for k, v in FOLDS.items()] + ["--max_dist", "2", "--save", "False",
                                                        "--out", str(tmp_path)]
    assert run_main(numerical_solving.main, argv) == 0
    out = capsys.readouterr().out
    assert "path steps" in out and "turned back" in out
    import csv

    rows = list(csv.DictReader(next(tmp_path.glob("*/records.csv")).open()))
    assert [int(r["folds"]) >= 1 for r in rows if r["round"] == "2"] == [True]
    assert all(r["converged"] == "True" for r in rows)


@pytest.mark.slow
def test_defaults_keep_their_fixed_points_through_the_folds():
    """The option table's setting (N = 2000), rounds 1-3 (the path folds twice in rounds 2 and 3):
    the accuracies and folds that docs/numerical_solving.md prints, every residual <= 1e-10; a
    solver that loses the branch changes them (about 30 s)."""
    p = th.build_problem(th.Setting(), "cpu", F64)
    got = [r for r in th.run_rounds(p, solver="exact", approx=False, rounds=3) if r["round"]]
    assert [(round(r["acc"]["clean"], 2), round(r["acc"]["noisy"], 2), r["folds"]) for r in got] == [
        (76.43, 28.32, 0), (60.18, 42.87, 2), (54.26, 46.86, 2)]
    assert all(r["residual"] <= 1e-10 for r in got)
