"""Exact solvers of the softmax fixed point  Y = softmax((T - Y) G / (N lambda)).

The unknown is B = T - Y, and the equation H(B, beta) = B + softmax(beta B G) - T = 0 with
beta = 1/(N lambda). Two solvers:
  `newton_at`                 Newton at one beta (a Gram matrix G: the fixed point is unique, so
                              Newton from any start that converges has found THE solution);
  `follow_weight_decay_path`  path following along beta (any G: which fixed point is returned must
                              be defined when there are several).

Both need many solves with the Jacobian  X -> nl X + M(X G)  (nl = N lambda = 1/beta, M the
column-wise softmax Jacobian diag(p) - p p^T), an N K x N K operator that is stiff at the
defaults. `JacobianPreconditioner` inverts a close approximation of it exactly, GMRES finishes.
Nothing here knows about labels, rounds or files; `utils/theory.py` calls these functions.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch


def softmax_jac(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Column-wise softmax Jacobian (diag(p) - p p^T) applied to X."""
    return P * X - P * (P * X).sum(-2, keepdim=True)


def per_sample(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Column j of the result is A_j X_j: A holds one K x K matrix per sample, as K x K x N. Products
    and a sum over whole rows: 5x faster than a batched product of N small matrices."""
    return (A * X[None]).sum(1)


def logits(times_G, X: torch.Tensor) -> torch.Tensor:
    """X G up to a constant in each column (times_G(D) = D G): (X_k - X_K) G in rows k < K, 0 in
    the last. Every use of X G here is blind to such constants: the softmax, the softmax Jacobians
    ((diag(p) - p p^T) 1 = 0) and the preconditioner's strong directions (orthogonal to 1). A row
    fewer is a quarter less work at K = 4 (a product with a few rows costs per row)."""
    Z = times_G(X[:-1] - X[-1:])
    return torch.cat([Z, Z.new_zeros(1, Z.shape[1])])


def kernel_logits(kernel, X: torch.Tensor) -> torch.Tensor:
    """`logits` with the products of a `utils.theory.Kernel`, G read in blocks."""
    return logits(partial(kernel.matmul, blocked=True), X)


def blocked_product(X: torch.Tensor, G: torch.Tensor, block_bytes: int = 1 << 20) -> torch.Tensor:
    """X G, G (rows contiguous: a matrix or its leading columns) read in blocks of whole rows of
    about `block_bytes` (1 MB: a core's L2 cache here), each used by every row of X while it is in
    cache; the blocks' products are summed. MKL's product with a few rows reads all of G once per
    row, from memory when G does not stay in cache (16 MB in float32 at N = 2000, beside the
    preconditioner's LU): with 3 rows this takes 0.7-0.75 of its time at N = 1000-4000 (with 1 row
    it does not help)."""
    N = G.shape[0]
    most = max(1, block_bytes // (G.shape[1] * G.element_size()))
    # a block height that divides N when one is near: no separate product for the last rows
    rows = next((r for r in range(most, most // 2, -1) if N % r == 0), most)
    blocks = N // rows
    if blocks < 2 or X.shape[0] < 2 or G.stride(1) != 1 or G.is_cuda:
        return X @ G
    head = blocks * rows
    parts = X[:, :head].reshape(X.shape[0], blocks, rows).transpose(0, 1)       # blocks x rows(X) x rows
    out = torch.bmm(parts, G[:head].unflatten(0, (blocks, rows))).sum(0)
    return out if head == N else out + X[:, head:] @ G[head:]


def split_directions(P: torch.Tensor, nl: float, strong: float, max_rank: int | None):
    """Each sample's softmax Jacobian diag(p) - p p^T = V diag(w) V^T (w: N x K, V: N x K x K), with
    w far below nl (1e-12 nl) set to 0, and which directions are strong: w > strong nl, at most
    max_rank of them (the largest w), which bounds the preconditioner's LU."""
    Pt = P.T
    w, V = torch.linalg.eigh(torch.diag_embed(Pt) - Pt[:, :, None] * Pt[:, None, :])
    w = torch.where(w > 1e-12 * nl, w, torch.zeros_like(w))
    is_strong = w > strong * nl
    if max_rank is not None and int(is_strong.sum()) > max_rank:
        is_strong &= w >= w.flatten().topk(max_rank).values[-1]
    return w, V, is_strong


# ----------------------------------------------------------------------------------------------
# The Jacobian and its preconditioner
# ----------------------------------------------------------------------------------------------

def top_subspace(G: torch.Tensor, m: int, gen: torch.Generator, iters: int = 8) -> torch.Tensor:
    """Orthonormal basis of the top-m eigen-directions of (G + G^T)/2 by subspace iteration. In the
    class-wise model these are the K class-mean directions, with eigenvalues ~ n(c-d) far above the
    rest (~1-c), so a few iterations suffice; the basis only feeds the preconditioner."""
    N = G.shape[0]
    m = min(m, N)
    Q = torch.randn(N, m, generator=gen, dtype=torch.float64).to(G)

    def times_sym(Q):                      # (Q^T G)^T reads G row by row: twice as fast as G^T Q
        return 0.5 * (G @ Q + (Q.T @ G).T)

    for _ in range(iters):
        Q, _ = torch.linalg.qr(times_sym(Q))
    w, V = torch.linalg.eigh(Q.T @ times_sym(Q))
    return Q @ V


@dataclass(frozen=True)
class Basis:
    """G ~ sigma I + U C U^T: G's top eigen-directions U (N x m) exactly (C = U^T G U - sigma I),
    the rest of its spectrum replaced by its mean sigma. Shared by every round of a setting."""
    U: torch.Tensor
    C: torch.Tensor
    sigma: float


def newton_basis(G: torch.Tensor, K: int, extra: int = 4, seed: int = 0) -> Basis:
    N = G.shape[0]
    m = min(K + extra, N)
    U = top_subspace(G, m, torch.Generator(device="cpu").manual_seed(seed))
    C = U.T @ G @ U
    sigma = ((torch.trace(G) - torch.trace(C)) / max(N - m, 1)).item() if N > m else 0.0
    return Basis(U, C - sigma * torch.eye(m, dtype=G.dtype, device=G.device), sigma)


@contextmanager
def subnormals_flushed():
    """Treat subnormal floats as zero inside the block (restored after). Confident samples have
    probabilities ~1e-40, subnormal in float32, and products of small entries make more; every
    matrix product that touches them is ~4x slower. At the solvers' tolerances they are zeros.
    torch has no getter for the mode, so it is restored to torch's default (off)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class JacobianPreconditioner:
    """Exact inverse of an approximation of the Jacobian  X -> nl X + M(X G)  at probabilities P.

    Each sample's M_j = diag(p_j) - p_j p_j^T is split along its eigen-directions: a direction
    with eigenvalue w > strong * nl is "strong" and keeps the exact G (these are the samples the
    fixed point balances, whose coupling through G makes the problem stiff); the others see
    G ~ sigma I + U C U^T (`Basis`). Then the operator is block diagonal (K x K per sample) plus a
    low-rank part of rank K m + r (r strong directions), inverted by Woodbury with one LU of that
    size. strong = inf: only the basis (cheap; good while beta = 1/nl is small); strong -> 0: every
    direction is exact and so is the inverse. What is left for GMRES is the weak directions'
    coupling through G - sigma I - U C U^T, of size about beta w |G - sigma I| < strong |...|.
    """

    def __init__(self, G: torch.Tensor, basis: Basis, P: torch.Tensor, nl: float, strong: float = math.inf,
                 product=None, max_rank: int | None = None):
        """G in the precision of the preconditioner (its columns are gathered). product(X, cols):
        X G[:, :cols], or that up to a constant per column (`logits`), in that precision (default:
        X @ G[:, :cols]); the columns it needs end with the last strong sample's, so an order of
        the samples with the strong ones first makes it a product with part of G. max_rank: see
        `split_directions`."""
        K, N = P.shape
        dtype = G.dtype
        U, C, sigma = basis.U.to(P), basis.C.to(P), basis.sigma
        m = U.shape[1]
        w, V, is_strong = split_directions(P, nl, strong, max_rank)          # N x K, N x K x K
        weak = torch.where(is_strong, torch.zeros_like(w), w)
        d_inv = 1.0 / (nl + sigma * weak)                                   # D_j = nl I + sigma M_weak,j
        Dinv = (V * d_inv[:, None, :]) @ V.transpose(1, 2)                  # N x K x K
        W = (V * (weak * d_inv)[:, None, :]) @ V.transpose(1, 2)            # D^-1 M_weak
        js, a = is_strong.nonzero(as_tuple=True)
        l = V[js, :, a] * w[js, a].sqrt()[:, None]                          # r x K: M_strong,j = sum l l^T
        cvec = U @ C.T                                                       # row j: C U^T e_j
        Dinv, W, l, U, cvec = (t.to(dtype) for t in (Dinv, W, l, U, cvec))
        r, km = js.numel(), K * m
        # unknowns: q = X U (K x m) and u = L^T (X G) / nl on the strong directions (r); the core
        # matrix of Woodbury's formula, block by block
        core = torch.empty(km + r, km + r, dtype=dtype, device=P.device)
        core[:km, :km] = torch.einsum("jkl,jb,ja->kalb", W, cvec, U).reshape(km, km)
        core[:km, :km].diagonal().add_(1.0)
        core[:km, km:] = (l[:, :, None] * U[js][:, None, :]).reshape(r, km).T
        # G's columns at the strong samples, each once (a sample has up to K - 1 strong directions)
        samples, of = torch.unique(js, return_inverse=True)                   # js = samples[of]
        G_cols = G.index_select(1, samples)
        Z = torch.einsum("ikl,ib->iklb", W, cvec).reshape(N, K * km)
        GZ = (G_cols.T @ Z).index_select(0, of).reshape(r, K, K, m)
        core[km:, :km] = torch.einsum("sk,sklb->slb", l, GZ).reshape(r, km)
        G_ss = G_cols.index_select(0, samples).index_select(0, of).index_select(1, of)
        core[km:, km:] = G_ss.T * (l @ l.T)                                  # G[js_t, js_s] at (s, t)
        core[km:, km:].diagonal().add_(nl)
        self.lu = torch.linalg.lu_factor(core)
        self.product = product if product is not None else (lambda X, cols: X @ G[:, :cols])
        self.cols = int(js.max()) + 1 if r else 0
        # K x K x N, as `per_sample` reads them
        self.Dinv, self.W = Dinv.permute(1, 2, 0).contiguous(), W.permute(1, 2, 0).contiguous()
        self.U, self.cvec, self.l, self.js = U, cvec, l, js
        self.shape, self.m, self.rank, self.dtype = (K, N), m, r, dtype

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        K, N = self.shape
        R = rhs.reshape(K, N).to(self.dtype)
        DR = per_sample(self.Dinv, R)                                          # D^-1 R
        DG = self.product(DR, self.cols).T[self.js] if self.rank else DR.new_zeros(0, K)   # (DR G) at js
        b = torch.cat([(DR @ self.U).reshape(-1), (self.l * DG).sum(1)])
        sol = torch.linalg.lu_solve(*self.lu, b[:, None]).squeeze(1)
        Q = sol[: K * self.m].reshape(K, self.m)
        u = sol[K * self.m:]
        X = DR - per_sample(self.W, Q @ self.cvec.T)
        strong_part = torch.zeros(N, K, dtype=R.dtype, device=R.device)
        strong_part.index_add_(0, self.js, self.l * u[:, None])
        return (X - strong_part.T).reshape(-1).to(rhs.dtype)


def gmres(matvec, b: torch.Tensor, precond, rtol: float, maxit: int) -> tuple[torch.Tensor, int, float]:
    """Right-preconditioned GMRES (no restart) for the Newton steps; classical Gram-Schmidt with a
    second pass when needed, Givens rotations in double precision. The preconditioned basis vectors
    are kept, so the solution needs no further application of the preconditioner (a product with G
    and an LU solve: a tenth of a typical solve). Returns (x, iterations, rel)."""
    n = b.numel()
    beta = b.norm().item()
    if beta == 0:
        return torch.zeros_like(b), 0, 0.0
    if not math.isfinite(beta):
        return torch.zeros_like(b), 0, math.inf
    V = torch.empty(maxit + 1, n, dtype=b.dtype, device=b.device)
    V[0] = b / beta
    H = [[0.0] * maxit for _ in range(maxit + 1)]
    cs, sn, g = [], [], [beta] + [0.0] * maxit
    j, rel, Z = 0, 1.0, []
    for j in range(maxit):
        Z.append(precond(V[j]))
        w = matvec(Z[j])
        w_norm = w.norm().item()
        h = V[: j + 1] @ w
        w = w - h @ V[: j + 1]
        hn = w.norm().item()
        if hn < 0.7 * w_norm:
            # cancellation: a second Gram-Schmidt pass restores orthogonality (DGKS criterion);
            # skipped otherwise, since each pass reads the whole basis
            h2 = V[: j + 1] @ w
            w = w - h2 @ V[: j + 1]
            h = h + h2
            hn = w.norm().item()
        col = h.double().tolist()
        for i in range(j):
            a, bb = col[i], col[i + 1]
            col[i], col[i + 1] = cs[i] * a + sn[i] * bb, -sn[i] * a + cs[i] * bb
        r = math.hypot(col[j], hn)
        if not r > 0:                       # the operator is singular on this Krylov space: stop here
            j -= 1
            break
        c_, s_ = col[j] / r, hn / r
        cs.append(c_)
        sn.append(s_)
        col[j] = r
        g[j + 1] = -s_ * g[j]
        g[j] = c_ * g[j]
        for i in range(j + 1):
            H[i][j] = col[i]
        rel = abs(g[j + 1]) / beta
        if rel <= rtol or hn == 0:
            break
        V[j + 1] = w / hn
    k = j + 1
    if k == 0:
        return torch.zeros_like(b), 0, 1.0
    y = [0.0] * k
    for i in range(k - 1, -1, -1):
        y[i] = (g[i] - sum(H[i][l] * y[l] for l in range(i + 1, k))) / H[i][i]
    yv = torch.tensor(y, dtype=b.dtype, device=b.device)
    return yv @ torch.stack(Z[:k]), k, rel


class JacobianSolver:
    """Solves  nl X + M_P(X G) = R  by GMRES with a `JacobianPreconditioner` that is kept while it
    serves (the Jacobian changes little from one step to the next) and rebuilt at the current point
    when GMRES needs more than `rebuild_after` iterations. Counts its work.

    For a dense G each build also reorders the samples, those with a strong direction first, and G
    with them (one float32 copy, which every Krylov product reads): the preconditioner's product is
    then with G's leading columns only (7/10 of G at the defaults). The solves run in that order."""

    def __init__(self, kernel, basis: Basis, strong: float, krylov_dtype=torch.float32,
                 rebuild_after: int = 15, max_krylov: int = 60, max_rank: int = 3000):
        self.kernel, self.basis, self.strong = kernel, basis, strong
        self.low = kernel.lowp(krylov_dtype)
        self.dtype, self.rebuild_after = krylov_dtype, rebuild_after
        self.max_krylov, self.max_rank = max_krylov, max_rank
        self.pre = self.order = self.position = self.G = None
        self.builds = self.krylov = self.largest_rank = 0

    def build(self, P: torch.Tensor, nl: float) -> None:
        N = P.shape[1]
        if self.low.thin():                  # products through the thin factor: no reordering
            order, self.G = torch.arange(N, device=P.device), self.low.G
        else:
            strong = split_directions(P, nl, self.strong, self.max_rank)[2].any(1)
            order = torch.cat([strong.nonzero()[:, 0], (~strong).nonzero()[:, 0]])
            self.G = self.low.G.index_select(0, order).index_select(1, order)
        self.order, self.position = order, torch.argsort(order)
        basis = Basis(self.basis.U[order], self.basis.C, self.basis.sigma)
        self.pre = JacobianPreconditioner(self.G, basis, P[:, order], nl, self.strong, self.logits,
                                          self.max_rank)
        self.builds += 1
        self.largest_rank = max(self.largest_rank, self.pre.rank)

    def logits(self, X: torch.Tensor, cols: int | None = None) -> torch.Tensor:
        """`logits` of X (in the build's order), with G's first `cols` columns (default: all)."""
        if self.low.thin():
            Z = kernel_logits(self.low, X)
            return Z if cols is None else Z[:, :cols]
        self.low.products[0] += 1
        G = self.G if cols is None else self.G[:, :cols]
        return logits(partial(blocked_product, G=G), X)

    def solve(self, P: torch.Tensor, nl: float, R: torch.Tensor, rtol: float) -> tuple[torch.Tensor, float]:
        K, N = P.shape
        rtol = max(rtol, 2e-6 if self.dtype == torch.float32 else 1e-13)
        for fresh in (self.pre is None, True):
            if fresh:
                self.build(P, nl)
            Pl = P.to(self.dtype)[:, self.order]

            def matvec(x):
                X = x.reshape(K, N)
                return (nl * X + softmax_jac(Pl, self.logits(X))).reshape(-1)

            x, its, rel = gmres(matvec, R.to(self.dtype)[:, self.order].reshape(-1), self.pre, rtol,
                                self.max_krylov)
            self.krylov += its
            if its > self.rebuild_after or rel > rtol:
                self.pre = None          # stale: the next solve (or the retry below) builds anew
            if rel <= rtol or fresh:
                break
        return x.reshape(K, N)[:, self.position].to(R.dtype), rel


# ----------------------------------------------------------------------------------------------
# The equation in B = T - Y, at one beta and along beta
# ----------------------------------------------------------------------------------------------

def equation(kernel, T: torch.Tensor, B: torch.Tensor, beta: float):
    """(H, P, BG): H(B) = B + softmax(beta B G) - T, P = softmax(beta B G) (Y = P solves (1) when
    H = 0) and the product B G (up to a constant per column: `logits`), which the path reuses."""
    BG = kernel_logits(kernel, B)
    P = torch.softmax(beta * BG, dim=0)
    return B + P - T, P, BG


def y_residual(kernel, T: torch.Tensor, P: torch.Tensor, beta: float) -> float:
    """max |Y - softmax(beta (T - Y) G)| at Y = P: the number every solver reports. (max|H| is not
    it: H's error is amplified by up to beta |G| / 4 on the way to Y.)"""
    return (P - torch.softmax(beta * kernel_logits(kernel, T - P), dim=0)).abs().max().item()


@dataclass
class NewtonResult:
    B: torch.Tensor
    P: torch.Tensor
    converged: bool
    iterations: int
    residual: float


def newton_at(kernel, T, B, beta: float, solver: JacobianSolver, tol: float, max_iter: int, log=None,
              what: str = "newton") -> NewtonResult:
    """Damped Newton on H(B) = 0 at fixed beta, to max|Y - F(Y)| <= tol. Steps by backtracking on
    ||H||, Krylov tolerances by Eisenstat-Walker; gives up after `max_iter` steps, when a step
    cannot decrease ||H||, or when ten steps gained less than a factor 3 (a start too far away)."""
    nl = 1.0 / beta
    H, P, _ = equation(kernel, T, B, beta)
    hnorm, forcing, history, res = H.norm().item(), 1e-2, [], float("inf")
    for it in range(max_iter + 1):
        history.append(hnorm)
        if not math.isfinite(hnorm) or (it >= 10 and hnorm > history[it - 10] / 3):
            break
        if H.abs().max().item() < 1e-6:                 # cheap necessary condition before the G product
            res = y_residual(kernel, T, P, beta)
            if res <= tol:
                return NewtonResult(B, P, True, it, res)
        if it == max_iter:
            break
        dB, _ = solver.solve(P, nl, -nl * H, forcing)
        step, h0 = 1.0, hnorm ** 2
        while True:
            H_new, P_new, _ = equation(kernel, T, B + step * dB, beta)
            h_new = H_new.norm().item()
            if math.isfinite(h_new) and h_new ** 2 <= (1 - 1e-4 * step) * h0:
                break
            step *= 0.5
            if step < 1e-4:
                return NewtonResult(B, P, False, it, res)
        forcing = min(0.1, max(0.9 * (h_new / hnorm) ** 2, 1e-12))   # Eisenstat-Walker, choice 2
        B, H, P, hnorm = B + step * dB, H_new, P_new, h_new
        if log:
            log(f"    {what} {it + 1}: beta={beta:.4g} step {step:g} max|H| {H.abs().max().item():.2e}")
    return NewtonResult(B, P, False, it, res)


def operator_norm(kernel, N: int, gen: torch.Generator, iters: int = 30) -> float:
    """||G||_2 by power iteration on x -> x G G^T (x a row), plus 1%: it only places the path's start."""
    x = torch.randn(1, N, generator=gen, dtype=torch.float64).to(kernel.G)
    s = 0.0
    for _ in range(iters):
        x = x / x.norm()
        y = kernel.matmul(x)                       # x G
        s = y.norm().item()
        x = (kernel.G @ y.T).T                     # y G^T
    return 1.01 * s


@dataclass
class PathResult:
    B: torch.Tensor
    P: torch.Tensor
    converged: bool
    residual: float
    steps: int
    folds: int
    corrections: int
    beta_start: float
    note: str = ""


@dataclass
class _Attempt:
    """One predictor-corrector step: where the corrector ended, and how it went. P and BG belong
    to (B, mu) when `ok`; z2 is the last bordered solve (arclength mode), the next tangent; first
    is the size of the first correction (inf when there was none)."""
    B: torch.Tensor
    mu: float
    ok: bool = False
    theta: float = 0.0
    iterations: int = 0
    z2: torch.Tensor | None = None
    P: torch.Tensor | None = None
    BG: torch.Tensor | None = None
    first: float = math.inf


class _Branch:
    """What the continuation's steps share: the equation's data (G, T), the Jacobian solver, the
    inner product <dB, dB'>/N + dmu dmu' of (B, mu) pairs, and the count of corrector steps."""

    def __init__(self, kernel, T: torch.Tensor, solver: JacobianSolver, path_tol: float,
                 max_correction: float):
        self.kernel, self.T, self.solver = kernel, T, solver
        self.N = T.shape[1]
        self.path_tol, self.max_correction = path_tol, max_correction
        self.corrections = 0

    def dot(self, B1, m1, B2, m2) -> float:
        return (B1 * B2).sum().item() / self.N + m1 * m2

    def dmu_term(self, BG, P, mu):            # dH/dmu = beta M(B G)
        return math.exp(mu) * softmax_jac(P, BG)

    def jsolve(self, P, mu, R, rtol):         # J_B X = R with J_B = I + beta M(.G) = beta (nl I + M(.G))
        nl = math.exp(-mu)
        X, _ = self.solver.solve(P, nl, nl * R, rtol)
        return X

    def first_tangent(self, B, mu, P):
        """The tangent's B-part v (for mu-part 1) at a point of the branch: J_B v = -dH/dmu."""
        return self.jsolve(P, mu, -self.dmu_term(kernel_logits(self.kernel, B), P, mu), 1e-3)

    def next_tangent(self, at: _Attempt):
        """The same at a corrected step's end; in arclength mode its last bordered solve is it."""
        if at.z2 is not None:
            return -at.z2
        return self.jsolve(at.P, at.mu, -self.dmu_term(at.BG, at.P, at.mu), 1e-3)

    def correct(self, B, mu, tB, tm, h: float, arclength: bool, bend=None) -> _Attempt:
        """Predict along the unit tangent (tB, tm) by h, bent by h^2/2 times `bend` (the tangent's
        change per unit length, when known), then correct with Newton: on the arclength hyperplane
        by bordering (two Jacobian solves) when `arclength`, at the predicted mu otherwise (one
        solve). It fails when the first correction is too large (the prediction cut across a bend
        and could land on another part of the curve) or the iterates contract by less than 0.6."""
        Bp, mp = B + h * tB, mu + h * tm
        if bend is not None:
            Bp, mp = Bp + 0.5 * h * h * bend[0], mp + 0.5 * h * h * bend[1]
        Bc, mc, ok, theta, prev, its, z2, Pc, BGc = Bp, mp, False, 0.0, None, 0, None, None, None
        first = math.inf
        for its in range(1, 8):
            Hc, Pc, BGc = equation(self.kernel, self.T, Bc, math.exp(mc))
            hmax = Hc.abs().max().item()
            if not math.isfinite(hmax):
                break
            if hmax <= self.path_tol and prev is not None:
                ok = True
                break
            # inexact Newton: the first corrections need only a rough solve
            rtol = 1e-2 if prev is None else min(1e-2, max(1e-4, hmax))
            z1 = self.jsolve(Pc, mc, -Hc, rtol)
            if arclength:
                g = self.dot(tB, tm, Bc - Bp, mc - mp)
                z2 = self.jsolve(Pc, mc, self.dmu_term(BGc, Pc, mc), rtol)
                dm = (-g - self.dot(tB, 0.0, z1, 0.0)) / (tm - self.dot(tB, 0.0, z2, 0.0))
                dB = z1 - dm * z2
            else:
                dB, dm = z1, 0.0
            size = math.sqrt(self.dot(dB, dm, dB, dm))
            first = size if prev is None else first
            if not math.isfinite(size) or (prev is None and size > self.correction_limit(h)):
                break
            if prev is not None:
                theta = max(theta, size / prev)
                if theta > 0.6:
                    break
            prev = size
            Bc, mc = Bc + dB, mc + dm
            self.corrections += 1
        return _Attempt(Bc, mc, ok, theta, its, z2, Pc, BGc, first)

    def correction_limit(self, h: float) -> float:
        """The largest first correction a step of length h may need (beyond it: redone shorter)."""
        return min(0.3 * h, self.max_correction)

    def next_length(self, h: float, at: _Attempt) -> float:
        """The step length after an attempt `at` of length h. The tangent predictor errs by O(h^2),
        so the first correction is about kappa h^2 (kappa = at.first / h^2), and the longest step
        whose first correction is half its limit min(0.3 h', max_correction) is
        h' = min(0.15 / kappa, sqrt(max_correction / (2 kappa))). After a success h' lies within
        [h/2, 2h], and within h/2 or 0.25 h / theta when the corrector contracted slowly (theta >= 0.05,
        it must stay below 0.6); a step that failed by its first correction shrinks to h' within
        [h/10, h/2]; any other failure halves h. (Doubling after each success, as before, made
        nearly every second attempt fail: each failure costs an equation and a Jacobian solve.)"""
        kappa = at.first / h ** 2
        model = min(0.15 / kappa, math.sqrt(self.max_correction / (2 * kappa))) / h if kappa > 0 else 2.0
        if at.ok:
            slow = 0.25 / at.theta if at.theta >= 0.05 else 2.0
            return h * min(2.0, max(0.5, min(model, slow)))
        if at.iterations == 1 and math.isfinite(at.first):
            return h * min(0.5, max(0.1, model))
        return 0.5 * h

    def step(self, B, mu, tB, tm, h: float, bend=None) -> tuple[_Attempt | None, float]:
        """A corrected step from (B, mu) along the tangent (and `bend`), shortening h until one
        succeeds; returns (the step, the h it took), or (None, h) when h fell below 1e-9."""
        # away from folds (the tangent rises steadily in mu) the corrector keeps mu fixed, which
        # needs one Jacobian solve per iteration instead of two; near a fold it needs the border
        arclength = tm < 0.3
        while True:
            at = self.correct(B, mu, tB, tm, h, arclength, bend)
            if at.ok:
                return at, h
            h = self.next_length(h, at)
            if h < 1e-9:
                return None, h


def unique_below(min_eig_sym: float) -> float:
    """The beta below which (1) has exactly one solution, from the smallest eigenvalue l of G's
    symmetric part S (inf when S is PSD). Two solutions B, B' give D = B - B' = -beta M(D G), M the
    mean of the softmax Jacobians between them (per column PSD with eigenvalues <= 1/2, so
    |M(V)|^2 <= <V, M(V)>/2); then |D|^2 <= beta^2/2 <D G, M(D G)> = -beta/2 <D G, D> <= beta |l|/2 |D|^2
    (<D G, D> = sum of D_k S D_k^T >= l |D|^2), so D = 0 when beta < 2/|l|. With M the Jacobian at one
    point the same lines show that the Jacobian is nonsingular there: no fold below this beta."""
    return math.inf if min_eig_sym >= 0 else 2.0 / -min_eig_sym


def follow_weight_decay_path(kernel, T: torch.Tensor, beta: float, solver: JacobianSolver, *, tol: float,
                             gen: torch.Generator, min_eig_sym: float | None = None, max_newton: int = 60,
                             max_steps: int = 2000, path_tol: float = 1e-6, max_correction: float = 0.02,
                             log=None) -> PathResult:
    """The fixed point at beta = 1/(N lambda) on the branch that starts at the unique solution for
    heavy weight decay, followed by pseudo-arclength continuation in mu = log beta.

    Why this branch: for beta0 = 1/(2 |G|_2) the map Y -> softmax(beta0 (T - Y) G) is a contraction
    (softmax is 1/2-Lipschitz), so (1) has exactly one solution there. Every solution satisfies
    |B| <= 1, so the branch through it cannot escape to infinity, and it cannot come back to beta0
    (the solution there is unique); generically it is a smooth curve in (B, mu) and must reach the
    target beta. It may turn back in beta on the way (a fold: two solutions meet); continuation in
    beta alone stops there, arclength continuation goes round. The result depends on T, G and
    lambda only, not on the solver's history (warm starts, previous rounds).

    Where it starts: the solution stays unique, and the branch a curve over beta, up to
    `unique_below(min_eig_sym)` (given the smallest eigenvalue of G's symmetric part), so the
    branch is the same from any beta below that: it starts at 0.9 times it (Newton from B = 0,
    a tenth away from the bound, where the Jacobian may be close to singular), or at beta0 when
    that Newton fails or the eigenvalue is not given (the contraction: Newton always converges).

    Predictor: the unit tangent (J_B v = -dH/dmu, t = (v, 1)/|.|) in the inner product
    <dB, dB'>/N + dmu dmu'. Corrector: Newton on [H = 0, <t, x - x_pred> = 0] by bordering (two
    Jacobian solves per iteration) where the tangent is steep (tm < 0.3, near a fold), Newton at the
    predicted mu elsewhere (one solve). A step is redone shorter when its first correction exceeds
    min(0.3 h, max_correction) or the corrector contracts by less than 0.6 per iteration: with 2000
    samples the branch has sharp bends (single samples switching classes), and a longer step can
    land on another part of the curve (checked: on small settings against a brute-force tracker in
    the tests; at the defaults, max_correction 0.05 and 0.02 give the same 10 rounds, 0.2 does not).
    Landing: Newton at the target beta from the secant point."""

    def start_at(b: float) -> NewtonResult:
        # Newton from B = 0 (Y = T): at the defaults 4 steps at the bound where T - 1/K took 9.
        # The answer when the target is below b; else the path's first point, which its first
        # step corrects to path_tol anyway
        return newton_at(kernel, T, torch.zeros_like(T), min(beta, b), solver,
                         tol if beta <= b else 0.1 * path_tol, max_newton, log, "start")

    beta_start = 0.9 * unique_below(min_eig_sym) if min_eig_sym is not None else math.inf
    start = start_at(beta_start) if beta_start < math.inf else None
    if start is None or not start.converged:
        beta_start = 0.5 / max(operator_norm(kernel, T.shape[1], gen), 1e-300)
        start = start_at(beta_start)
        if not start.converged:
            return PathResult(start.B, start.P, False, math.inf, 0, 0, 0, beta_start,
                              f"Newton did NOT converge at beta = {min(beta, beta_start):.4g}, where the "
                              "map is a contraction (should not happen)")
    if beta <= beta_start:
        return PathResult(start.B, start.P, True, start.residual, 0, 0, 0, beta_start)
    branch = _Branch(kernel, T, solver, path_tol, max_correction)
    return _continue(branch, start, beta_start, beta, tol=tol, max_newton=max_newton, max_steps=max_steps,
                     log=log)


def _continue(branch: _Branch, start: NewtonResult, beta_start: float, beta: float, *, tol: float,
              max_newton: int, max_steps: int, log) -> PathResult:
    """The steps of `follow_weight_decay_path` from its start at beta_start to the target beta."""
    B, mu, P = start.B, math.log(beta_start), start.P
    mu_start, mu_end = mu, math.log(beta)
    h, steps, folds, h_last = 0.05, 0, 0, 0.0
    tB_prev, tm_prev, bend = None, 1.0, None
    v = branch.first_tangent(B, mu, P)

    def failed(note: str) -> PathResult:
        return PathResult(B, P, False, float("inf"), steps, folds, branch.corrections, beta_start, note)

    while steps < max_steps:
        size = math.sqrt(branch.dot(v, 1.0, v, 1.0))
        tB, tm = v / size, 1.0 / size
        if tB_prev is not None:
            if branch.dot(tB, tm, tB_prev, tm_prev) < 0:
                tB, tm = -tB, -tm
            # the tangent's change over the last step: a second-order predictor, whose error is
            # O(h^3) instead of O(h^2), so the corrector starts closer (fewer Jacobian solves);
            # not after a sharp turn (a hairpin, a fold), where it says nothing about the next step
            dB, dm = tB - tB_prev, tm - tm_prev
            bend = (dB / h_last, dm / h_last) if branch.dot(dB, dm, dB, dm) <= 0.1 else None
        at, h = branch.step(B, mu, tB, tm, h, bend)
        if at is None:
            return failed(f"path following stalled at beta = {math.exp(mu):.4g} "
                          "(step length below 1e-9)")
        if at.mu >= mu_end:                 # crossed the target: land on it from the secant point
            landed = _land(branch, B, mu, at, mu_end, beta, tol, max_newton, log)
            if landed.converged:
                return _landed(landed, beta_start, steps + 1, folds, branch.corrections)
            h *= 0.5                        # too coarse near the target: approach it in shorter steps
            continue
        v_new = branch.next_tangent(at)
        steps += 1
        if (branch.dot(v_new, 1.0, tB, tm) < 0) != (tm < 0):   # the oriented tangent's mu-part changed sign
            folds += 1
        B, mu, P, v = at.B, at.mu, at.P, v_new
        tB_prev, tm_prev, h_last = tB, tm, h
        if mu < mu_start - 1.0:             # below the start, where the solution is unique: reversed
            return failed("path following reversed (it walked back below its start)")
        if log:
            rank = branch.solver.pre.rank if branch.solver.pre is not None else "-"
            log(f"    path {steps}: beta={math.exp(mu):.4g} h {h:.3g} corrector {at.iterations} "
                f"contraction {at.theta:.2f} (preconditioner rank {rank})")
        h = branch.next_length(h, at)
    return failed(f"path following did NOT reach the target within {max_steps} steps "
                  f"(at beta = {math.exp(mu):.4g})")


def _land(branch: _Branch, B, mu: float, at: _Attempt, mu_end: float, beta: float, tol: float,
          max_newton: int, log) -> NewtonResult:
    """Newton at the target beta from the secant point between (B, mu) and the step beyond it."""
    a = (mu_end - mu) / (at.mu - mu)
    return newton_at(branch.kernel, branch.T, B + a * (at.B - B), beta, branch.solver, tol,
                     min(max_newton, 20), log, what="landing")


def _landed(out: NewtonResult, beta_start: float, steps: int, folds: int, corrections: int) -> PathResult:
    note = (f"path from beta = {beta_start:.3g}: {steps} steps" +
            (f", the branch turned back {folds} time(s) (folds: other fixed points exist)" if folds else ""))
    return PathResult(out.B, out.P, True, out.residual, steps, folds, corrections, beta_start, note)
