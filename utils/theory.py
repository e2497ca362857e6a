"""The theory model of the paper: fixed points of self-distillation for a linear softmax probe.

K classes, n samples each (N = Kn), a "correlation" matrix G (N x N), targets T (K x N, columns on
the simplex) and weight decay lambda. The optimal probe's outputs Y solve

    Y = softmax((T - Y) G / (N lambda))                                 (1)   softmax mode
    Y = 1/K + ((T - Y) G / (N lambda)) / K                              (2)   linear mode

and round t + 1 solves the same equation with T := Y_t (round 1 uses the given labels).

Everything here is a small function of tensors, with no files: the command line lives in
`numerical_solving.py`, the names, arrays, records and figure of a run in `utils/theory_outputs.py`.
Sections: the model (its settings, matrix, labels), diagnostics, solvers (linear closed form,
Newton-Krylov for softmax, the original's Adam), the closed-form theory of the class-wise model,
and one setting run round by round.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from utils import softmax_solver as ss
from utils.options import Interval, option, options_of

GRAMS = ("original", "psd", "features")
LABEL_NOISE = ("sampled", "exact")
SOLVERS = ("exact", "faithful")
ADAM_STOP_LOSS = 1e-5      # the original's stopping rule: ||Y - F(Y)||^2 below this


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """Everything that changes the numbers of one run (the seed included), each declared once: its
    flag, default, constraint and help, and whether a sweep may vary it. The parser, the checks and
    the sweep keys (numerical_solving.py), the run names and the records' leading columns
    (utils/theory_outputs.py) are derived from these declarations; the field order is the order of
    the names and columns: keep it."""
    k: int = option(4, "--k", type=int, valid=Interval(int, 2, note="number of classes"), sweep=True,
                    help="number of classes K")
    n: int = option(500, "--n", type=int, valid=Interval(int, 1, note="samples per class"), sweep=True,
                    help="samples per class n (N = K n)")
    lbd: float = option(1e-5, "--lbd", type=float,
                        valid=Interval(float, 0, closed="neither", note="the weight decay, e.g. --lbd 1e-5"),
                        sweep=True,
                        help="weight decay lambda > 0")
    c: float = option(0.4, "--c", type=float, valid=Interval(float, -1, 1, note="a correlation"),
                      sweep=True, help="intra-class correlation, in [-1, 1]")
    d: float = option(0.1, "--d", type=float, valid=Interval(float, -1, 1, note="a correlation"),
                      sweep=True, help="inter-class correlation, in [-1, 1]")
    eta: float = option(0.5, "--eta", type=float, valid=Interval(float, 0, 1, note="the corruption ratio"),
                        sweep=True,
                        help="label corruption ratio, in [0, 1]")
    epsilon: float = option(0.05, "--epsilon", type=float,
                            valid=Interval(float, 0, 1, note="the noise level of G"), sweep=True,
                            help="noise level of G (uniform in [-eps, eps]), in [0, 1]")
    seed: int = option(0, "--seed", type=int, valid=Interval(int, 0), new=True,
                       sweep=True, help="seed of G's noise, the labels and Adam's starts")
    gram: str = option("original", "--gram", choices=GRAMS, new=True, sweep=True,
                       help="original: the original's non-symmetric noisy matrix; psd: its PSD projection; "
                            "features: Gram matrix of noisy features (a true Gram matrix, fast)")
    labels: str = option("sampled", "--labels", choices=LABEL_NOISE, new=True, sweep=True,
                         help="sampled: each label flips with probability eta (original); "
                              "exact: exactly eta n per class")

    @property
    def N(self) -> int:
        return self.k * self.n


SETTING_OPTIONS = options_of(Setting)     # {field: Option}, in declaration order


def sub_seeds(seed: int) -> dict:
    """Independent streams for the matrix, the labels and the Adam starts: the same seed gives the
    same labels whatever --gram or --solver is chosen, so runs can be compared sample by sample."""
    children = np.random.SeedSequence(int(seed)).spawn(3)
    names = ("gram", "labels", "adam")
    return {name: int(child.generate_state(1, dtype=np.uint64)[0] % (2 ** 63))
            for name, child in zip(names, children)}


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def true_classes(k: int, n: int) -> torch.Tensor:
    """Samples are stored class by class: 0..0, 1..1, ... (the block structure of G)."""
    return torch.arange(k).repeat_interleave(n)


def block_matrix(k: int, n: int, c: float, d: float, dtype=torch.float64) -> torch.Tensor:
    """The class-wise correlation model without noise: c inside a class, d across, 1 on the diagonal."""
    y = true_classes(k, n)
    same = y[:, None] == y[None, :]
    G = torch.where(same, torch.tensor(c, dtype=dtype), torch.tensor(d, dtype=dtype))
    G.fill_diagonal_(1.0)
    return G


@dataclass
class Kernel:
    """G, and when G is a Gram matrix of known features, the features Phi (r x N, G = Phi^T Phi).

    `matmul(X)` is X G; with a thin factor (r < N/2) it is computed as (X Phi^T) Phi, which is
    cheaper, and it is the form that makes "features whose Gram matrix is G" explicit."""
    G: torch.Tensor
    factor: torch.Tensor | None = None
    description: str = ""
    products: list = field(default_factory=lambda: [0], repr=False)   # products with G so far, all precisions
    _low: dict = field(default_factory=dict, repr=False)

    @property
    def N(self) -> int:
        return self.G.shape[0]

    def thin(self) -> bool:
        return self.factor is not None and self.factor.shape[0] < self.N // 2

    def matmul(self, X: torch.Tensor, blocked: bool = False) -> torch.Tensor:
        """X G. `blocked`: a dense G on the CPU is read in blocks of rows (`softmax_solver.
        blocked_product`), faster but rounded differently from X @ G (the faithful Adam keeps the
        original's product)."""
        self.products[0] += 1
        if self.thin():
            return (X @ self.factor.T) @ self.factor
        return ss.blocked_product(X, self.G) if blocked else X @ self.G

    def lowp(self, dtype) -> "Kernel":
        """A copy in a lower precision for the inner Krylov solves (memory traffic halves)."""
        if dtype not in self._low:
            factor = None if self.factor is None else self.factor.to(dtype)
            self._low[dtype] = Kernel(self.G.to(dtype), factor, self.description, self.products)
        return self._low[dtype]


def original_gram(k, n, c, d, epsilon, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """As the original: the block matrix plus i.i.d. uniform noise in [-eps, eps] on EVERY entry
    (not symmetrised), then ones on the diagonal. Not a Gram matrix in general."""
    N = k * n
    G = block_matrix(k, n, c, d, dtype)
    if epsilon > 0:
        G = G + (torch.rand(N, N, generator=gen, dtype=dtype) * 2 - 1) * epsilon
    G.fill_diagonal_(1.0)
    return G


def psd_projection(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-in-spirit Gram matrix: symmetrise, clip negative eigenvalues to 0, rescale to a unit
    diagonal. Returns (G_psd, Phi) with G_psd = Phi^T Phi exactly (Phi has only the kept
    eigen-directions), so the result is a true Gram matrix of explicit features."""
    S = 0.5 * (G + G.T)
    w, U = torch.linalg.eigh(S)
    keep = w > 0
    Phi = (U[:, keep] * w[keep].sqrt()).T          # r x N
    norms = Phi.norm(dim=0).clamp_min(torch.finfo(G.dtype).tiny)
    Phi = Phi / norms                              # unit diagonal; column scaling keeps PSD
    return Phi.T @ Phi, Phi


def feature_dim_for_noise(c: float, epsilon: float) -> int:
    """Noise dimension D so that off-diagonal noise (1-c)<z_i, z_j> of random unit vectors has the
    variance of the original's uniform noise: (1-c)^2 / D = epsilon^2 / 3."""
    return max(1, int(round(3 * (1 - c) ** 2 / epsilon ** 2)))


def feature_gram(k, n, c, d, epsilon, gen: torch.Generator,
                 dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A true Gram matrix with the model's block means: phi_i = [B^(1/2) e_class(i), sqrt(1-c) z_i]
    with B = (c-d) I + d 11^T (K x K) and z_i unit vectors. ||phi_i|| = 1, <phi_i, phi_j> = c or d
    plus (1-c)<z_i, z_j>. epsilon = 0 uses orthonormal z_i (G is the block matrix exactly); otherwise
    z_i are random directions in D = 3(1-c)^2/eps^2 dimensions (same noise variance as the
    original, but symmetric, and G has rank <= K + D)."""
    N = k * n
    B = (c - d) * torch.eye(k, dtype=dtype) + d * torch.ones(k, k, dtype=dtype)
    w, V = torch.linalg.eigh(B)
    root = (V * w.clamp_min(0).sqrt()) @ V.T       # symmetric square root of B
    cls = root[:, true_classes(k, n)]             # K x N
    if epsilon == 0 or c >= 1:
        Z = torch.eye(N, dtype=dtype)
    else:
        D = feature_dim_for_noise(c, epsilon)
        Z = torch.randn(D, N, generator=gen, dtype=dtype)
        Z = Z / Z.norm(dim=0)
    Phi = torch.cat([cls, math.sqrt(max(1 - c, 0.0)) * Z], dim=0)
    return Phi.T @ Phi, Phi


def build_kernel(s: Setting, dtype=torch.float64) -> Kernel:
    gen = generator(sub_seeds(s.seed)["gram"])
    if s.gram == "original":
        return Kernel(original_gram(s.k, s.n, s.c, s.d, s.epsilon, gen, dtype), None,
                      "original: block matrix + uniform noise on every entry (not symmetrised), "
                      "unit diagonal")
    if s.gram == "psd":
        G, Phi = psd_projection(original_gram(s.k, s.n, s.c, s.d, s.epsilon, gen, dtype))
        return Kernel(G, Phi, "psd: original symmetrised, negative eigenvalues clipped, unit diagonal "
                              f"(rank {Phi.shape[0]})")
    if s.gram == "features":
        G, Phi = feature_gram(s.k, s.n, s.c, s.d, s.epsilon, gen, dtype)
        return Kernel(G, Phi, f"features: Gram matrix of {Phi.shape[0]}-dimensional features with the block "
                              f"means and symmetric noise of the original's variance")
    raise ValueError(f"unknown gram {s.gram!r}")


def noisy_labels(true: torch.Tensor, k: int, eta: float, gen: torch.Generator,
                 exact: bool = False) -> torch.Tensor:
    """Each sample keeps its class with probability 1-eta, else takes a uniformly random OTHER class
    (the original). `exact`: per class exactly round(eta n) samples are corrupted, spread as evenly
    as possible over the other classes, so realised label frequencies equal the population ones."""
    N = true.numel()
    if not exact:
        flip = torch.rand(N, generator=gen, dtype=torch.float64) < eta
        offset = torch.randint(1, k, (N,), generator=gen) if k > 1 else torch.zeros(N, dtype=torch.long)
        return torch.where(flip, (true + offset) % k, true)
    given = true.clone()
    for cls in range(k):
        idx = (true == cls).nonzero().squeeze(1)
        m = int(round(eta * idx.numel()))
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[:m]]
        offset = torch.arange(m) % (k - 1) + 1
        given[chosen] = (cls + offset) % k
    return given


def one_hot(labels: torch.Tensor, k: int, dtype=torch.float64) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, k).T.to(dtype)


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------

def gram_diagnostics(G: torch.Tensor, full_spectrum_max_n: int = 1000) -> dict:
    """Is G a Gram matrix? Symmetry, and the smallest eigenvalue of its symmetric part (x^T G x only
    sees that part). For small N also the eigenvalue of G itself with the smallest real part."""
    import scipy.linalg

    Gc = G.detach().to("cpu", torch.float64)
    asym = (Gc - Gc.T).abs().max().item()
    S = (0.5 * (Gc + Gc.T)).numpy()
    N = S.shape[0]
    lo = float(scipy.linalg.eigh(S, eigvals_only=True, subset_by_index=[0, 0], driver="evr")[0])
    hi = float(scipy.linalg.eigh(S, eigvals_only=True, subset_by_index=[N - 1, N - 1], driver="evr")[0])
    tol = 1e-9 * max(1.0, abs(hi))
    out = {"symmetric": asym <= 1e-12 * max(1.0, abs(hi)), "asymmetry": asym, "min_eig_sym": lo,
           "max_eig_sym": hi, "psd": lo >= -tol, "min_real_eig": None}
    out["gram"] = out["symmetric"] and out["psd"]
    if N <= full_spectrum_max_n:
        out["min_real_eig"] = torch.linalg.eigvals(Gc).real.min().item()
    return out


def describe_diagnostics(diag: dict) -> list[str]:
    lines = [f"G symmetric: {'yes' if diag['symmetric'] else 'no'} (max|G - G^T| = {diag['asymmetry']:.3g}); "
             f"eigenvalues of (G + G^T)/2 in [{diag['min_eig_sym']:.4g}, {diag['max_eig_sym']:.4g}]"
             + ("" if diag["min_real_eig"] is None
                else f"; smallest real part of an eigenvalue of G: {diag['min_real_eig']:.4g}")]
    if diag["gram"]:
        lines.append("G is a Gram matrix (symmetric PSD): the softmax fixed point is unique (strictly convex "
                     "kernel logistic regression)")
    else:
        why = []
        if not diag["symmetric"]:
            why.append("not symmetric")
        if not diag["psd"]:
            why.append(f"smallest eigenvalue {diag['min_eig_sym']:.3g} < 0")
        lines.append(f"WARNING: G is NOT a Gram matrix ({', '.join(why)}): no features have this G, (1) is "
                     "not the optimality condition of a convex problem, and the fixed point may not be "
                     "unique; the exact solver reports the one on the branch that continues the unique "
                     "solution for heavy weight decay (path following in lambda). --gram psd or --gram "
                     "features keep G a true Gram matrix.")
    return lines


# ----------------------------------------------------------------------------------------------
# Fixed-point maps and residuals
# ----------------------------------------------------------------------------------------------

def fixed_point_map(Y, T, kernel: Kernel, lbd: float, approx: bool):
    """F(Y) of (1) or (2)."""
    K, N = Y.shape
    Z = kernel.matmul(T - Y) / (N * lbd)
    return 1.0 / K + Z / K if approx else torch.softmax(Z, dim=0)


def fixed_point_residual(Y, T, kernel: Kernel, lbd: float, approx: bool) -> float:
    """max |Y - F(Y)|, the number every solver reports."""
    return (Y - fixed_point_map(Y, T, kernel, lbd, approx)).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------

@dataclass
class Solve:
    Y: torch.Tensor
    residual: float
    iterations: int
    converged: bool
    note: str = ""
    work: int = 0          # products with G (exact softmax) or Adam steps
    folds: int | None = None   # exact softmax on the weight-decay path: times the branch turned back
    growth: float | None = None    # exact linear: the rounds' growth per round in the limit (> 1: divergence)


def linear_rounds(kernel: Kernel, T0: torch.Tensor, lbd: float, rounds: int,
                  tol: float = 1e-10) -> list[Solve]:
    """All rounds of (2) in closed form: Y (I + S) = J/K + T S with S = G/(K N lambda); one LU of
    (I + S) serves every round (a round is one triangular solve). Every Solve carries the rounds'
    growth factor (`round_growth`): above 1 the rounds diverge, and each round's note says so."""
    K, N = T0.shape
    S = kernel.G / (K * N * lbd)
    A = torch.eye(N, dtype=S.dtype, device=S.device) + S
    LU, piv = torch.linalg.lu_factor(A.T.contiguous())   # we solve Y A = B, i.e. A^T Y^T = B^T

    def times_round_map(X):                              # X S (I + S)^-1
        return torch.linalg.lu_solve(LU, piv, (X @ S).T.contiguous()).T.contiguous()

    out, T = [], T0
    for _ in range(rounds):
        B = 1.0 / K + T @ S
        Y = torch.linalg.lu_solve(LU, piv, B.T.contiguous()).T.contiguous()
        res = fixed_point_residual(Y, T, kernel, lbd, approx=True)
        # rounding makes the residual proportional to the size of Y, so the tolerance is relative
        # once the outputs leave [0, 1] (they do when the rounds amplify, see below)
        scale = max(1.0, Y.abs().max().item())
        out.append(Solve(Y, res, 1, res <= tol * scale))
        T = Y
    growth = round_growth(times_round_map, out[0].Y - T0) if out else 0.0
    for sol in out:
        scale = max(1.0, sol.Y.abs().max().item())
        note = ""
        if growth > 1:
            note = (f"outputs grow round after round (max|Y| = {scale:.3g}, x{growth:.3g} a round in the "
                    "limit): G has eigenvalues with real part below -K N lambda / 2 = "
                    f"{-K * N * lbd / 2:.3g}, along which a round multiplies by |s/(1+s)| > 1 instead of "
                    "averaging (G is not PSD)")
        if not sol.converged:
            note = (f"residual {sol.residual:.2e} above {tol:.0e} x max(1, max|Y|): "
                    f"I + G/(K N lambda) is ill-conditioned. " + note)
        sol.note, sol.growth = note.strip(), growth
    return out


def round_growth(times_round_map, D: torch.Tensor, steps: int = 40) -> float:
    """How much a linear round multiplies the outputs' change in the limit, measured on the numbers:
    Y_{t+1} - Y_t = (Y_t - Y_{t-1}) S (I + S)^-1, so continuing that map is the power iteration of
    the round map. It starts from the first round's change D = Y_1 - T0 plus a fixed random
    direction of the same size (rounding excites every direction sooner or later, so one the labels
    hardly touch counts too); the geometric mean of its growth over the second half of `steps`
    estimates the largest |s/(1+s)| (s = eigenvalue of G / (K N lambda)). Below 1 the rounds
    converge (a Gram matrix: every |s/(1+s)| < 1); above 1 the outputs grow without bound."""
    R = torch.randn(D.shape, generator=generator(0), dtype=torch.float64).to(D)
    norm = D.norm().item()
    X = R / R.norm() + (D / norm if norm > 0 and math.isfinite(norm) else 0.0)
    logs = []
    for _ in range(steps):
        X = times_round_map(X)
        norm = X.norm().item()
        if not norm > 0 or not math.isfinite(norm):
            return 0.0 if norm == 0 else math.inf
        logs.append(math.log(norm))
        X = X / norm
    tail = logs[len(logs) // 2:]
    return math.exp(sum(tail) / len(tail))


def jacobian_solvers(kernel: Kernel, K: int, seed: int) -> dict:
    """The Jacobian solvers of one setting (they share G's top directions): Newton on a Gram matrix
    does best with the cheap preconditioner (strong = inf: G's top directions only); the path at
    stiff lambda needs the balanced samples' directions exact (strong = 1)."""
    basis = ss.newton_basis(kernel.G, K, seed=seed)
    return {"newton": ss.JacobianSolver(kernel, basis, strong=math.inf),
            "path": ss.JacobianSolver(kernel, basis, strong=1.0)}


def softmax_fixed_point(kernel: Kernel, T: torch.Tensor, lbd: float, solvers: dict, *, gram: bool,
                        B0: torch.Tensor | None, tol: float, max_newton: int, gen: torch.Generator,
                        min_eig_sym: float | None = None, log=None) -> tuple[Solve, torch.Tensor]:
    """Solve (1) to max|Y - F(Y)| <= tol. Returns (Solve, B) with B = T - Y, the next round's warm
    start. A Gram matrix G has exactly one fixed point, so Newton from the warm start (or from
    B = 0, uniform outputs, in round 1) is tried first; when it fails (round 1 at stiff lambda),
    and always when G is not a Gram matrix, the fixed point is the one on the weight-decay path
    (`softmax_solver.follow_weight_decay_path`, which starts where the fixed point is unique by
    `min_eig_sym`, the smallest eigenvalue of G's symmetric part), whatever the rounds before found."""
    K, N = T.shape
    beta = 1.0 / (N * lbd)
    before = kernel.products[0]
    with ss.subnormals_flushed():
        if gram:
            start = B0 if B0 is not None else torch.zeros_like(T)
            out = ss.newton_at(kernel, T, start, beta, solvers["newton"], tol, min(max_newton, 20), log)
            if out.converged:
                work = kernel.products[0] - before
                return Solve(out.P, out.residual, out.iterations, True, "", work), out.B
        path = ss.follow_weight_decay_path(kernel, T, beta, solvers["path"], tol=tol, gen=gen,
                                           min_eig_sym=min_eig_sym, max_newton=max_newton, log=log)
    ok, res = path.converged, path.residual          # the landing stopped on max|Y - F(Y)| <= tol
    note = path.note if ok else f"did NOT reach the tolerance: residual {res:.2e} > {tol:.0e}; {path.note}"
    return Solve(path.P, res, path.steps, ok, note, kernel.products[0] - before, path.folds), path.B


def faithful_adam(kernel: Kernel, T: torch.Tensor, lbd: float, approx: bool, max_iter: int,
                  gen: torch.Generator, stop_loss: float = ADAM_STOP_LOSS) -> Solve:
    """The original solver: minimise ||Y - F(Y)||^2 over Y with Adam (lr 1e-2 in linear mode, 1e-3
    in softmax mode) from a random column-normalised Y, projecting after every step (clamp at 1e-6,
    renormalise columns), until the loss is below 1e-5 or after max_iter steps. The projection
    also applies in linear mode, where the exact solution may have negative entries (a quirk kept)."""
    K, N = T.shape
    Y0 = torch.rand(K, N, generator=gen, dtype=torch.float64).to(T)
    Y = (Y0 / Y0.sum(0, keepdim=True)).requires_grad_(True)
    opt = torch.optim.Adam([Y], lr=1e-2 if approx else 1e-3)
    loss_value, it = float("inf"), 0
    for it in range(1, max_iter + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((Y - fixed_point_map(Y, T, kernel, lbd, approx)) ** 2).sum()
        loss_value = loss.item()
        if loss_value < stop_loss:
            it -= 1
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            Y.clamp_(min=1e-6)
            Y.div_(Y.sum(0, keepdim=True))
    Y = Y.detach()
    res = fixed_point_residual(Y, T, kernel, lbd, approx)
    stopped = loss_value < stop_loss
    note = (f"Adam stopped: loss {loss_value:.2e} < {stop_loss:g} after {it} steps" if stopped
            else f"Adam hit --max_iter {max_iter}: loss {loss_value:.2e}, NOT a fixed point")
    return Solve(Y, res, it, stopped, note, it)


# ----------------------------------------------------------------------------------------------
# Closed-form theory of the class-wise model (epsilon = 0, linear approximation)
# ----------------------------------------------------------------------------------------------

def block_spectrum(k: int, n: int, c: float, d: float) -> dict:
    """Eigenvalues of the block matrix (with their multiplicities) and their eigen-spaces:
    small: within-class deviations; big: contrasts of class means; all: the all-ones vector."""
    N = k * n
    small = 1 - c
    big = 1 - c + n * (c - d)
    return {"small": (small, N - k), "big": (big, k - 1), "all": (big + N * d, 1)}


def shrink_factors(k: int, n: int, c: float, d: float, lbd: float) -> dict:
    """mu = s/(1+s), s = eigenvalue/(K N lambda): the factor each round multiplies that component by."""
    N = k * n
    out = {}
    for name, (g, _) in block_spectrum(k, n, c, d).items():
        s = g / (k * N * lbd)
        out[name] = s / (1 + s) if 1 + s != 0 else float("nan")
    return out


def closed_form_outputs(T0: torch.Tensor, true: torch.Tensor, k: int, n: int, c: float, d: float, lbd: float,
                        t: int) -> torch.Tensor:
    """Y_t of (2) for the block matrix G, exactly:

        y_i(t) = (1 - a^t)/K + a^t m + b^t (m_k - m) + s^t (t_i - m_k)

    with m the mean given label, m_k the mean given label of sample i's class k, and (a, b, s) the
    shrink factors of the all-ones, class-mean and within-class eigen-spaces. Derivation: 1_N is an
    eigenvector, so J/K (I+S)^-1 = (1-a) J/K and the rounds sum to (1 - a^t) J/K; the label part is
    T times the spectral projectors, each raised to the t-th power."""
    mu = shrink_factors(k, n, c, d, lbd)
    a, b, s = mu["all"], mu["big"], mu["small"]
    m = T0.mean(dim=1, keepdim=True)
    class_means = torch.stack([T0[:, true == cls].mean(dim=1) for cls in range(k)], dim=1)   # K x K
    mk = class_means[:, true]
    return (1 - a ** t) / k + a ** t * m + b ** t * (mk - m) + s ** t * (T0 - mk)


def theory_rounds_to_perfect(k: int, n: int, c: float, d: float, lbd: float, eta: float) -> dict:
    """The paper's condition for 100% population accuracy under symmetric noise (linear approx.,
    epsilon = 0): with label frequencies equal to the corruption matrix (1-eta on the diagonal,
    eta/(K-1) elsewhere) and a balanced overall mean, a sample of class k whose given label is l != k
    is predicted correctly in round t iff

        b^t Delta > s^t (1 + Delta),   Delta = (1 - eta) - eta/(K-1),

    i.e. (b/s)^t > (1 + Delta)/Delta; clean samples and the other classes are correct for every
    t >= 1 once Delta > 0 and b > s. Returns t* (the first such round) or None with the reason."""
    mu = shrink_factors(k, n, c, d, lbd)
    b, s = mu["big"], mu["small"]
    delta = (1 - eta) - eta / (k - 1)
    out = {"delta": delta, "mu": mu, "threshold": None, "t_star": None, "reason": ""}
    if eta == 0:
        out.update(t_star=0, reason="no corrupted labels: the given labels are already 100% correct")
        return out
    if not delta > 0:
        out["reason"] = ("the true class is not the most frequent given label "
                         f"(eta >= (K-1)/K = {(k - 1) / k:.3g}); no round reaches 100%")
        return out
    if not all(math.isfinite(v) and v >= 0 for v in (b, s)):
        out["reason"] = "a shrink factor is negative or undefined (G has eigenvalues <= -K N lambda)"
        return out
    out["threshold"] = (1 + delta) / delta
    if s == 0:
        out.update(t_star=1, reason="mu_small = 0 (c = 1): one round averages every class")
        return out
    if not b > s:
        out["reason"] = "mu_big <= mu_small (c <= d): class means do not outlast the label noise"
        return out
    t = max(1, math.floor(math.log(out["threshold"]) / math.log(b / s)) + 1)
    while (b / s) ** t <= out["threshold"]:   # guard the floor against rounding
        t += 1
    while t > 1 and (b / s) ** (t - 1) > out["threshold"]:
        t -= 1
    out["t_star"] = t
    return out


def accuracies(Y: torch.Tensor, true: torch.Tensor, given: torch.Tensor) -> dict:
    """Accuracy (%) of argmax Y against the true classes, overall and split by whether the sample's
    given label was clean or corrupted (nan for an empty group)."""
    pred = Y.argmax(dim=0).cpu()
    ok = (pred == true).double()
    clean = given == true

    def pct(mask):
        return 100.0 * ok[mask].mean().item() if mask.any() else float("nan")

    return {"clean": pct(clean), "noisy": pct(~clean), "overall": 100.0 * ok.mean().item()}


def first_perfect_round(accs, start: int = 1) -> int | None:
    """First round whose accuracy is 100% (rounds numbered from `start`). `accs`: any iterable of
    accuracies, read only up to that round (a generator computes no round beyond it)."""
    for i, a in enumerate(accs):
        if a >= 100.0 - 1e-9:
            return i + start
    return None


# ----------------------------------------------------------------------------------------------
# One setting, round by round
# ----------------------------------------------------------------------------------------------

def resolve_dtype(dtype: str, solver: str):
    if dtype == "auto":
        # exact solver: float64 (the residual target 1e-10 needs it); faithful: float32, the
        # default dtype of the original's tensors
        return torch.float64 if solver == "exact" else torch.float32
    return {"float32": torch.float32, "float64": torch.float64}[dtype]


@dataclass
class Problem:
    setting: Setting
    kernel: Kernel
    true: torch.Tensor
    given: torch.Tensor
    T0: torch.Tensor
    diagnostics: dict
    seconds: float


def build_problem(s: Setting, device="cpu", dtype=torch.float64, diagnostics: bool = True) -> Problem:
    t0 = time.perf_counter()
    kernel = build_kernel(s, torch.float64)     # built in float64 on the CPU: same numbers on any device
    diag = gram_diagnostics(kernel.G) if diagnostics else {}
    true = true_classes(s.k, s.n)
    given = noisy_labels(true, s.k, s.eta, generator(sub_seeds(s.seed)["labels"]), exact=s.labels == "exact")
    factor = None if kernel.factor is None else kernel.factor.to(device, dtype)
    kernel = Kernel(kernel.G.to(device, dtype), factor, kernel.description)
    T0 = one_hot(given, s.k, dtype).to(device)
    return Problem(s, kernel, true, given, T0, diag, time.perf_counter() - t0)


def closed_form_first_perfect(problem: Problem, horizon: int) -> int | None:
    """First round (1..horizon) whose closed-form accuracy with the realised labels is 100%
    (cheap: a formula per round, evaluated until one is)."""
    s = problem.setting
    T0 = problem.T0.detach().to("cpu", torch.float64)
    overall = (accuracies(closed_form_outputs(T0, problem.true, s.k, s.n, s.c, s.d, s.lbd, t), problem.true,
                          problem.given)["overall"] for t in range(1, horizon + 1))
    return first_perfect_round(overall)


def run_rounds(problem: Problem, *, solver: str, approx: bool, rounds: int, max_iter: int = 100000,
               tol: float = 1e-10, max_newton: int = 60, log=None):
    """Yield one dict per round (round 0 = the given labels): Y, accuracies of the solved and of the
    closed-form outputs, residual, iterations, seconds and the solver's note."""
    s, kernel = problem.setting, problem.kernel
    true, given, T0 = problem.true, problem.given, problem.T0
    T0_cpu = T0.detach().to("cpu", torch.float64)
    yield {"round": 0, "Y": T0, "acc": accuracies(T0, true, given), "cf_acc": accuracies(T0, true, given),
           "residual": 0.0, "iterations": 0, "work": 0, "converged": True, "seconds": 0.0,
           "note": "given labels", "cf_gap": 0.0, "folds": None, "growth": None}
    gen = generator(sub_seeds(s.seed)["adam"])
    T, B = T0, None
    linear = None
    jacobian = None
    for t in range(1, rounds + 1):
        t0 = time.perf_counter()
        if solver == "faithful":
            sol = faithful_adam(kernel, T, s.lbd, approx, max_iter, gen)
        elif approx:
            if linear is None:
                linear = linear_rounds(kernel, T0, s.lbd, rounds, tol)
            sol = linear[t - 1]
        else:
            if jacobian is None:            # built once, they serve every round
                jacobian = jacobian_solvers(kernel, s.k, sub_seeds(s.seed)["gram"])
                diag = problem.diagnostics or gram_diagnostics(kernel.G)
            sol, B = softmax_fixed_point(kernel, T, s.lbd, jacobian, gram=diag["gram"], B0=B, tol=tol,
                                         max_newton=max_newton, gen=generator(sub_seeds(s.seed)["gram"]),
                                         min_eig_sym=diag["min_eig_sym"], log=log)
        if kernel.G.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        Ycf = closed_form_outputs(T0_cpu, true, s.k, s.n, s.c, s.d, s.lbd, t)
        yield {"round": t, "Y": sol.Y, "acc": accuracies(sol.Y, true, given),
               "cf_acc": accuracies(Ycf, true, given), "residual": sol.residual, "iterations": sol.iterations,
               "work": sol.work, "converged": sol.converged, "seconds": seconds, "note": sol.note,
               "folds": sol.folds, "growth": sol.growth,
               "cf_gap": (sol.Y.detach().to("cpu", torch.float64) - Ycf).abs().max().item()}
        T = sol.Y.detach()
