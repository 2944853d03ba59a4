"""An independent dense float64 oracle for the curvature core, written straight from the definitions in docs/math.md.

It shares no code with ``kfac_lens``: it reads the weights of the ``nn.Linear`` modules directly and
builds everything from definitions, with explicit loops, ``torch.autograd.functional`` Jacobians and
Hessians, explicit ``torch.kron`` and explicit ``torch.linalg.inv``. It is slow on purpose and only meant
for tiny networks (P up to a few hundred).

Conventions (docs/math.md §1): layers are 0-based indices of the model's ``nn.Linear`` modules;
``W_k = [weight, bias]`` (bias as last column, absent for ``bias=False``); ``vec(W) = W.T.reshape(-1)``
so ``W[r, c]`` sits at offset ``c·d_out + r``; θ stacks the vec's of the selected layers.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

FAMILIES = ("categorical", "bernoulli", "gaussian")


# ----------------------------------------------------------------------------------------- network walk
def modules(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of a (possibly nested) nn.Sequential, in call order."""
    out = []
    for child in model.children():
        out.extend(modules(child) if isinstance(child, nn.Sequential) else [child])
    return out


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in modules(model) if isinstance(m, nn.Linear)]


def all_layers(model, layers=None) -> list[int]:
    return list(range(len(linears(model)))) if layers is None else list(layers)


def W_of(lin: nn.Linear) -> torch.Tensor:
    """W = [weight, bias] (bias as last column), as float64 on the CPU."""
    w = lin.weight.detach().to("cpu", torch.float64)
    if lin.bias is None:
        return w.clone()
    return torch.cat([w, lin.bias.detach().to("cpu", torch.float64)[:, None]], dim=1)


def vec(W: torch.Tensor) -> torch.Tensor:
    """Column-major vec: W[r, c] → offset c·rows + r."""
    return W.T.reshape(-1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def shapes(model, layers=None) -> list[tuple[int, int]]:
    lins = linears(model)
    return [tuple(W_of(lins[k]).shape) for k in all_layers(model, layers)]


def sizes(model, layers=None) -> list[int]:
    return [r * c for r, c in shapes(model, layers)]


def offsets(szs) -> list[int]:
    out = [0]
    for s in szs:
        out.append(out[-1] + s)
    return out


def theta(model, layers=None) -> torch.Tensor:
    lins = linears(model)
    return torch.cat([vec(W_of(lins[k])) for k in all_layers(model, layers)])


def _abar(h: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    if lin.bias is None:
        return h
    return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)


def forward(model, X: torch.Tensor, th: torch.Tensor | None = None, layers=None, record: bool = False):
    """z = f(X; θ): walk the modules, Linear k computes ``s = ā W_kᵀ`` with W_k from θ when k is selected.

    With ``record`` also returns the lists (ā_k, s_k) over all Linear layers. Parameter-free modules are
    applied as they are, to a copy of their input.
    """
    sel = all_layers(model, layers)
    lins = linears(model)
    Ws = {}
    if th is not None:
        offs = offsets([r * c for r, c in shapes(model, sel)])
        for i, k in enumerate(sel):
            r, c = W_of(lins[k]).shape
            Ws[k] = unvec(th[offs[i]:offs[i + 1]], r, c)
    h = X
    abars, ss = [], []
    k = 0
    for m in modules(model):
        if isinstance(m, nn.Linear):
            W = Ws.get(k, W_of(m))
            ab = _abar(h, m)
            h = ab @ W.T
            abars.append(ab)
            ss.append(h)
            k += 1
        else:
            h = m(h.clone())  # a clone: in-place modules (ReLU(inplace=True)) must not touch s
    return (h, abars, ss) if record else h


def forward_from(model, k: int, s: torch.Tensor) -> torch.Tensor:
    """Continue the forward pass from the output s of Linear k (weights from the modules)."""
    mods = modules(model)
    idx = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)][k]
    h = s
    for m in mods[idx + 1:]:
        if isinstance(m, nn.Linear):
            h = _abar(h, m) @ W_of(m).T
        else:
            h = m(h.clone())  # a clone: in-place modules (ReLU(inplace=True)) must not touch s
    return h


# ----------------------------------------------------------------------------------------- likelihoods
def loss(family: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L(y, z) = −log r(y|z) of one case (z of shape (C,))."""
    if family == "categorical":
        return -torch.log_softmax(z, dim=0)[int(y)]
    if family == "bernoulli":
        return -(y * nn.functional.logsigmoid(z) + (1 - y) * nn.functional.logsigmoid(-z)).sum()
    if family == "gaussian":
        return 0.5 * ((z - y) ** 2).sum()
    raise KeyError(family)


def output_fisher(family: str, z: torch.Tensor) -> torch.Tensor:
    """F_R(z) of one case (docs/math.md §2 table)."""
    C = z.shape[0]
    if family == "categorical":
        p = torch.softmax(z, dim=0)
        return torch.diag(p) - torch.outer(p, p)
    if family == "bernoulli":
        p = torch.sigmoid(z)
        return torch.diag(p * (1 - p))
    if family == "gaussian":
        return torch.eye(C, dtype=z.dtype)
    raise KeyError(family)


def random_targets(family: str, N: int, C: int, gen: torch.Generator) -> torch.Tensor:
    if family == "categorical":
        return torch.randint(0, C, (N,), generator=gen)
    if family == "bernoulli":
        return (torch.rand(N, C, generator=gen, dtype=torch.float64) < 0.5).to(torch.float64)
    return torch.randn(N, C, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- Fisher matrices
def jacobians(model, X, layers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, J) with J[n] = ∂z_n/∂θ of shape (C, P), one per case."""
    th = theta(model, layers)
    X = X.to(torch.float64)
    Js = []
    zs = []
    for n in range(X.shape[0]):
        xn = X[n:n + 1]
        Js.append(jacobian(lambda t, xn=xn: forward(model, xn, t, layers)[0], th))
        zs.append(forward(model, xn)[0])
    return torch.stack(zs), torch.stack(Js)


def exact_fisher(model, X, family, layers=None) -> torch.Tensor:
    """F = (1/N) Σ_n J_nᵀ F_R(z_n) J_n."""
    z, J = jacobians(model, X, layers)
    F = sum(J[n].T @ output_fisher(family, z[n]) @ J[n] for n in range(J.shape[0]))
    return F / J.shape[0]


def ggn(model, X, y, family, layers=None) -> torch.Tensor:
    """Jᵀ H_L J with H_L = ∂²L(y_n, z)/∂z² from torch.autograd.functional.hessian, averaged over cases."""
    z, J = jacobians(model, X, layers)
    out = 0
    for n in range(J.shape[0]):
        H = hessian(lambda zz, yn=y[n]: loss(family, zz, yn), z[n])
        out = out + J[n].T @ H @ J[n]
    return out / J.shape[0]


def label_gradients(model, X, y, family, layers=None) -> torch.Tensor:
    """Per-case gradients ∂L(y_n, f(x_n, θ))/∂θ, shape (N, P), in the oracle layout."""
    X = X.to(torch.float64)
    rows = []
    for n in range(X.shape[0]):
        th = theta(model, layers).requires_grad_(True)
        L = loss(family, forward(model, X[n:n + 1], th, layers)[0], y[n])
        (g,) = torch.autograd.grad(L, th)
        rows.append(g)
    return torch.stack(rows)


def empirical_fisher(model, X, y, family, layers=None) -> torch.Tensor:
    G = label_gradients(model, X, y, family, layers)
    return sum(torch.outer(g, g) for g in G) / G.shape[0]


# ----------------------------------------------------------------------------------------- per-case ā, g
def per_case(model, X):
    """Per case n: z_n, the list ā_k (a_dim_k,) and the list J_k = ∂z_n/∂s_k (C, d_k), all layers."""
    X = X.to(torch.float64)
    out = []
    for n in range(X.shape[0]):
        z, abars, ss = forward(model, X[n:n + 1], record=True)
        Jk = [jacobian(lambda s, k=k: forward_from(model, k, s[None])[0], ss[k][0].detach())
              for k in range(len(ss))]
        out.append((z[0].detach(), [a[0].detach() for a in abars], Jk))
    return out


def kronecker_factors(model, X, family, layers=None, y=None):
    """A[k, l] = (1/N) Σ_n ā_k ā_lᵀ and G[k, l] = (1/N) Σ_n E_y[g_k g_lᵀ] for all pairs of ``layers``.

    Exact expectation over y: ``E_y[g_k g_lᵀ] = J_kᵀ F_R(z) J_l`` (g_k = J_kᵀ ∇_z L). With ``y`` given
    the empirical version ``g_k g_lᵀ`` with the training label's ∇_z L.
    """
    sel = all_layers(model, layers)
    cases = per_case(model, X)
    N = len(cases)
    A, G = {}, {}
    for k in sel:
        for l in sel:
            A[k, l] = sum(torch.outer(a[k], a[l]) for _, a, _ in cases) / N
            Gs = 0
            for n, (z, _, J) in enumerate(cases):
                if y is None:
                    Gs = Gs + J[k].T @ output_fisher(family, z) @ J[l]
                else:
                    zz = z.clone().requires_grad_(True)
                    (r,) = torch.autograd.grad(loss(family, zz, y[n]), zz)
                    Gs = Gs + torch.outer(J[k].T @ r, J[l].T @ r)
            G[k, l] = Gs / N
    return A, G


def kfac_dense(A, G, layers) -> torch.Tensor:
    """F̃ with block (k, l) = kron(A[k, l], G[k, l])."""
    return torch.cat([torch.cat([torch.kron(A[k, l], G[k, l]) for l in layers], 1) for k in layers], 0)


def damp(A, G, layers, gamma, pi="trace"):
    """docs/math.md §4: Ā_kk + π γ I and G_kk + (γ/π) I; cross factors unchanged."""
    A, G = dict(A), dict(G)
    pis = {}
    for k in layers:
        Akk, Gkk = A[k, k], G[k, k]
        if pi == "trace":
            p = math.sqrt((torch.trace(Akk).item() / Akk.shape[0]) / (torch.trace(Gkk).item() / Gkk.shape[0]))
        else:
            p = float(pi)
        pis[k] = p
        A[k, k] = Akk + p * gamma * torch.eye(Akk.shape[0], dtype=Akk.dtype)
        G[k, k] = Gkk + gamma / p * torch.eye(Gkk.shape[0], dtype=Gkk.dtype)
    return A, G, pis


def blockdiag_inverse(Ad, Gd, layers) -> torch.Tensor:
    """F̆⁻¹ = diag(inv(Ā_kk ⊗ G_kk)) of damped factors."""
    return torch.block_diag(*[torch.linalg.inv(torch.kron(Ad[k, k], Gd[k, k])) for k in layers])


def tridiag_parts(Ad, Gd, layers):
    """Ψ_{i,i+1} = F̃_{i,i+1} F̃_{i+1,i+1}⁻¹ and Σ_{i|i+1}, all from explicit Kronecker products."""
    Ft = {(k, l): torch.kron(Ad[k, l], Gd[k, l]) for k in layers for l in layers}
    psis, sigmas = [], []
    for k, l in itertools.pairwise(layers):
        psi = Ft[k, l] @ torch.linalg.inv(Ft[l, l])
        psis.append(psi)
        sigmas.append(Ft[k, k] - psi @ Ft[l, l] @ psi.T)
    sigmas.append(Ft[layers[-1], layers[-1]])
    return psis, sigmas


def tridiag_inverse(Ad, Gd, layers) -> torch.Tensor:
    """F̂⁻¹ = Ξᵀ Λ Ξ (docs/math.md §5), Λ = diag(inv(Σ_{i|i+1}), …, inv(Σ_ℓ)), Ξ = I − Ψ on the super-diagonal."""
    psis, sigmas = tridiag_parts(Ad, Gd, layers)
    szs = [s.shape[0] for s in sigmas]
    offs = offsets(szs)
    P = offs[-1]
    Xi = torch.eye(P, dtype=torch.float64)
    for i, psi in enumerate(psis):
        Xi[offs[i]:offs[i + 1], offs[i + 1]:offs[i + 2]] = -psi
    Lam = torch.block_diag(*[torch.linalg.inv(S) for S in sigmas])
    return Xi.T @ Lam @ Xi


def exact_tikhonov_inverse(A, G, layers, xi) -> torch.Tensor:
    """diag((Ā_kk ⊗ G_kk + ξ I)⁻¹) of the undamped factors."""
    blocks = []
    for k in layers:
        K = torch.kron(A[k, k], G[k, k])
        blocks.append(torch.linalg.inv(K + xi * torch.eye(K.shape[0], dtype=K.dtype)))
    return torch.block_diag(*blocks)


# ----------------------------------------------------------------------------------------- cumulants
def set_partitions(items: list) -> list[list[list]]:
    """All set partitions of ``items`` (Bell number many: 2 for 2 items, 5 for 3, 15 for 4)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for p in set_partitions(rest):
        out.append([[first]] + p)
        for i in range(len(p)):
            out.append(p[:i] + [[first] + p[i]] + p[i + 1:])
    return out


def moment(w: torch.Tensor, variables: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """E[Π X_v] over weighted rows, as a tensor over the variables' index letters."""
    eq = "r," + ",".join("r" + letter for letter, _ in variables) + "->" + "".join(lt for lt, _ in variables)
    return torch.einsum(eq, w, *[x for _, x in variables])


def joint_cumulant(w: torch.Tensor, variables: list[tuple[str, torch.Tensor]], out: str):
    """κ(X_1..X_n) = Σ_π (|π|−1)! (−1)^{|π|−1} Π_{B∈π} E[Π_{v∈B} X_v]; returns (tensor over ``out``, #terms)."""
    parts = set_partitions(list(range(len(variables))))
    total = 0
    for part in parts:
        coef = (-1) ** (len(part) - 1) * math.factorial(len(part) - 1)
        factors = [("".join(variables[v][0] for v in B), moment(w, [variables[v] for v in B])) for B in part]
        prod = torch.einsum(",".join(lt for lt, _ in factors) + "->" + out, *[t for _, t in factors])
        total = total + coef * prod
    return total, len(parts)


def _bernoulli_outcomes(C: int) -> torch.Tensor:
    return torch.tensor([[(b >> c) & 1 for c in range(C)] for b in range(2 ** C)], dtype=torch.float64)


def cumulant_rows(model, X, family, k, l, y=None):
    """Rows (weight w, ā_k, g_k, ā_l, g_l) enumerating (case, y) exactly (categorical: every class weighted by
    p; Bernoulli: every binary vector weighted by its probability), or the training targets when ``y`` is given."""
    cases = per_case(model, X)
    N = len(cases)
    W, ak, gk, al, gl = [], [], [], [], []
    for n, (z, a, J) in enumerate(cases):
        if y is not None:
            outcomes = [(y[n], 1.0)]
        elif family == "categorical":
            p = torch.softmax(z, 0)
            outcomes = [(torch.tensor(c), float(p[c])) for c in range(z.shape[0])]
        elif family == "bernoulli":
            p = torch.sigmoid(z)
            outcomes = [(yy, float(torch.prod(torch.where(yy > 0, p, 1 - p))))
                        for yy in _bernoulli_outcomes(z.shape[0])]
        else:
            raise ValueError("no exact enumeration over y for a Gaussian")
        for yy, weight in outcomes:
            zz = z.clone().requires_grad_(True)
            (r,) = torch.autograd.grad(loss(family, zz, yy), zz)
            W.append(weight / N)
            ak.append(a[k])
            gk.append(J[k].T @ r)
            al.append(a[l])
            gl.append(J[l].T @ r)
    return (torch.tensor(W, dtype=torch.float64), torch.stack(ak), torch.stack(gk),
            torch.stack(al), torch.stack(gl))


def cumulant_terms(model, X, family, k, l, y=None) -> dict[str, torch.Tensor]:
    """Appendix B terms of block (k, l), each indexed [k1, k2, k3, k4] (ā(1), g(1), ā(2), g(2))."""
    w, a1, g1, a2, g2 = cumulant_rows(model, X, family, k, l, y)
    I_, J_, M_, N_ = ("i", a1), ("j", g1), ("m", a2), ("n", g2)
    diff = moment(w, [I_, J_, M_, N_]) - torch.einsum("im,jn->ijmn", moment(w, [I_, M_]), moment(w, [J_, N_]))
    k4, n4 = joint_cumulant(w, [I_, J_, M_, N_], "ijmn")
    k3_a2, n3 = joint_cumulant(w, [M_, J_, N_], "mjn")
    k3_a1, _ = joint_cumulant(w, [I_, J_, N_], "ijn")
    k1_a1, n1 = joint_cumulant(w, [I_], "i")
    k1_a2, _ = joint_cumulant(w, [M_], "m")
    assert (n4, n3, n1) == (15, 5, 1)
    return {
        "difference": diff,
        "kappa4": k4,
        "mean_a1_kappa3": torch.einsum("i,mjn->ijmn", k1_a1, k3_a2),
        "mean_a2_kappa3": torch.einsum("m,ijn->ijmn", k1_a2, k3_a1),
    }


# ----------------------------------------------------------------------------------------- helpers
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F (both moved to float64 CPU)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    nb = float(b.norm())
    return float((a - b).norm()) / (nb if nb > 0 else 1.0)


def block(M: torch.Tensor, szs, i: int, j: int) -> torch.Tensor:
    o = offsets(szs)
    return M[o[i]:o[i + 1], o[j]:o[j + 1]]


# ----------------------------------------------------------------------------------------- test problems
def make_net(kind: str, seed: int = 0, scale: float = 1.5) -> nn.Sequential:
    """Small float64 networks with uneven widths (weights scaled up a little for non-trivial curvature).

    - ``d2``: 4-6-3, ReLU;
    - ``d3``: 5-7-3-4, Tanh then Sigmoid;
    - ``d4``: 5-6-4-5-3 with a nested Sequential, a ``bias=False`` layer 1, Identity, ReLU and Tanh.
    """
    torch.manual_seed(seed)
    if kind == "d2":
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    elif kind == "d3":
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Sigmoid(), nn.Linear(3, 4))
    elif kind == "d4":
        net = nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(),
                            nn.Sequential(nn.Linear(6, 4, bias=False), nn.Identity()),
                            nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh())
    else:
        raise KeyError(kind)
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def make_inputs(net: nn.Module, N: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, linears(net)[0].in_features, generator=gen, dtype=torch.float64)


def n_outputs(net: nn.Module) -> int:
    return linears(net)[-1].out_features


N_CASES = 10  # cases per test problem
# (network kind, layer subset) pairs the core tests sweep
NET_CASES = [("d2", None), ("d3", None), ("d4", None), ("d4", [1, 2]), ("d4", [0, 2]), ("d3", [0, 2])]


def problem(kind, family, n=N_CASES, seed=1):
    """A test network of ``kind``, n inputs and random targets for ``family`` (shared by the core tests)."""
    net = make_net(kind)
    X = make_inputs(net, n, seed=seed)
    y = random_targets(family, n, n_outputs(net), torch.Generator().manual_seed(seed + 100))
    return net, X, y


# ----------------------------------------------------------------------------------------- centred cumulants
def centred_cumulant_terms(model, X, family, k, l, y=None) -> dict[str, torch.Tensor]:
    """The Appendix B terms without cancellation when activations have a large mean.

    Cumulants of order ≥ 2 do not change under shifts, so κ4 and κ3 are the partition sums of the
    *centred* rows (each partition term is then of the size of the result). The difference is a covariance
    of products, F − F̃ = E[(ac)(bd)] − E[ac]E[bd] = E[(ac − E[ac])(bd − E[bd])]. Means are κ(x) = E[x].
    """
    w, a1, g1, a2, g2 = cumulant_rows(model, X, family, k, l, y)

    def centre(x):
        return x - moment(w, [("i", x)])[None, :] / w.sum()

    c1, h1, c2, h2 = centre(a1), centre(g1), centre(a2), centre(g2)
    I_, J_, M_, N_ = ("i", c1), ("j", h1), ("m", c2), ("n", h2)
    k4, _ = joint_cumulant(w, [I_, J_, M_, N_], "ijmn")
    k3_a2, _ = joint_cumulant(w, [M_, J_, N_], "mjn")
    k3_a1, _ = joint_cumulant(w, [I_, J_, N_], "ijn")
    u = a1[:, :, None] * a2[:, None, :]  # rows of ac, (R, i, m)
    v = g1[:, :, None] * g2[:, None, :]  # rows of bd, (R, j, n)
    u = u - torch.einsum("r,rim->im", w, u)[None] / w.sum()
    v = v - torch.einsum("r,rjn->jn", w, v)[None] / w.sum()
    return {
        "difference": torch.einsum("r,rim,rjn->ijmn", w, u, v),
        "kappa4": k4,
        "mean_a1_kappa3": torch.einsum("i,mjn->ijmn", moment(w, [("i", a1)]), k3_a2),
        "mean_a2_kappa3": torch.einsum("m,ijn->ijmn", moment(w, [("m", a2)]), k3_a1),
    }


def restrict_blocks(M: torch.Tensor, szs, keep) -> torch.Tensor:
    """The submatrix of M on the block rows and columns ``keep`` (indices into ``szs``)."""
    o = offsets(szs)
    idx = torch.cat([torch.arange(o[i], o[i + 1]) for i in keep])
    return M[idx][:, idx]


# ----------------------------------------------------------------------------------------- approximations of F
def eigenbasis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors of a symmetric matrix (columns)."""
    return torch.linalg.eigh(0.5 * (M + M.T))[1]


def ekfac_dense(F, A, G, layers, szs) -> torch.Tensor:
    """EK-FAC (George et al. 2018), block-diagonal: for block k, Q = kron(U_A, U_G) from the eigenvectors of
    Ā_kk and G_kk, and the scaling s = diag(Qᵀ F_kk Q) (the second moments of the projected per-case gradients,
    E_x E_y[(Qᵀ∇θ_k L)²]); the block is Q diag(s) Qᵀ."""
    blocks = []
    for i, k in enumerate(layers):
        Q = torch.kron(eigenbasis(A[k, k]), eigenbasis(G[k, k]))
        s = torch.diag(Q.T @ block(F, szs, i, i) @ Q)
        blocks.append(Q @ torch.diag(s) @ Q.T)
    return torch.block_diag(*blocks)


def ekfac_scaling_by_enumeration(model, X, family, k, A, G) -> torch.Tensor:
    """EK-FAC's scaling of layer k straight from its definition: s_i = Σ_{n, y} w (q_iᵀ vec(g āᵀ))² over every
    (case, target) with its probability (:func:`cumulant_rows`; categorical or bernoulli), q_i the columns of
    kron(U_A, U_G). vec(g āᵀ) = kron(ā, g) in the column-major layout."""
    w, a, g, _, _ = cumulant_rows(model, X, family, k, k)
    Q = torch.kron(eigenbasis(A[k, k]), eigenbasis(G[k, k]))
    grads = torch.stack([torch.kron(a[r], g[r]) for r in range(w.shape[0])])
    return ((grads @ Q) ** 2 * w[:, None]).sum(0)


def fisher_diagonal(F: torch.Tensor) -> torch.Tensor:
    """diag(F) as a matrix."""
    return torch.diag(torch.diag(F))


def exact_block_diagonal(F: torch.Tensor, szs) -> torch.Tensor:
    """The exact diagonal blocks F_kk, zero elsewhere."""
    return torch.block_diag(*[block(F, szs, i, i) for i in range(len(szs))])


def tridiag_approximation(A, G, layers) -> torch.Tensor:
    """F̂ from its definition: the Gaussian chain equal to F̃ on the tridiagonal blocks, block (i, j>i) =
    F̃_{i,i+1} pinv(F̃_{i+1,i+1}) F̃_{i+1,i+2} ⋯ F̃_{j−1,j}, from explicit Kronecker products."""
    Ft = {(k, l): torch.kron(A[k, l], G[k, l]) for k in layers for l in layers}
    n = len(layers)
    B = {}
    for i in range(n):
        B[i, i] = Ft[layers[i], layers[i]]
        for j in range(i + 1, n):
            step = Ft[layers[j - 1], layers[j]]
            B[i, j] = step if j == i + 1 else B[i, j - 1] @ torch.linalg.pinv(Ft[layers[j - 1], layers[j - 1]]) @ step
            B[j, i] = B[i, j].T
    return torch.cat([torch.cat([B[i, j] for j in range(n)], 1) for i in range(n)], 0)


def loss_gradient(model, X, y, family, layers=None) -> torch.Tensor:
    """∇h = mean over cases of the per-case gradients (oracle layout)."""
    return label_gradients(model, X, y, family, layers).mean(0)


def generalized_eigvals(F: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of M⁻¹F (F symmetric, M SPD), descending, as those of L⁻¹ F L⁻ᵀ with M = L Lᵀ."""
    Li = torch.linalg.inv(torch.linalg.cholesky(0.5 * (M + M.T)))
    return torch.linalg.eigvalsh(Li @ F @ Li.T).flip(0)


# ----------------------------------------------------------------------------------------- any nn.Module
# For networks that are not a chain: the test names the layer modules (nn.Linear / nn.Conv2d) in the order
# of their first use, by hand. W = [weight.reshape(out, −1), bias] (docs/math.md §1); the whole model runs
# through torch.func.functional_call with the layers' parameters taken from θ, so per-case Jacobians of the
# whole parameter vector come from autograd, whatever the module does between its layers.
def layer_matrix(mod: nn.Module) -> torch.Tensor:
    """W = [weight.reshape(out, −1), bias] as float64 on the CPU."""
    w = mod.weight.detach().to("cpu", torch.float64).reshape(mod.weight.shape[0], -1)
    if mod.bias is None:
        return w.clone()
    return torch.cat([w, mod.bias.detach().to("cpu", torch.float64)[:, None]], dim=1)


def module_shapes(mods) -> list[tuple[int, int]]:
    return [tuple(layer_matrix(m).shape) for m in mods]


def module_theta(mods) -> torch.Tensor:
    return torch.cat([vec(layer_matrix(m)) for m in mods])


def module_params(model: nn.Module, mods, th: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameter dict for functional_call with the layers' weights and biases read from θ."""
    names = {id(p): n for n, p in model.named_parameters()}
    out, start = {}, 0
    for m in mods:
        r, c = layer_matrix(m).shape
        W = unvec(th[start:start + r * c], r, c)
        start += r * c
        if m.bias is None:
            out[names[id(m.weight)]] = W.reshape(m.weight.shape)
        else:
            out[names[id(m.weight)]] = W[:, :-1].reshape(m.weight.shape)
            out[names[id(m.bias)]] = W[:, -1]
    return out


def positionwise_output_fisher(family: str, z: torch.Tensor) -> torch.Tensor:
    """F_R of one case whose output z has shape (C,) or (T, C) (one likelihood term per position: the
    block-diagonal of the positions' F_R), for the output flattened row-major."""
    if z.ndim == 1:
        return output_fisher(family, z)
    return torch.block_diag(*[output_fisher(family, zt) for zt in z.reshape(-1, z.shape[-1])])


def module_jacobians(model: nn.Module, mods, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, J) with J[n] = ∂z_n/∂θ (C, P) — (T·C, P) for an output per position, z_n flattened — one case
    at a time, by autograd through functional_call."""
    from torch.func import functional_call

    th = module_theta(mods)
    zs, Js = [], []
    for n in range(X.shape[0]):
        xn = X[n:n + 1]

        def f(t, xn=xn):
            return functional_call(model, module_params(model, mods, t), (xn,))[0]

        zs.append(f(th).detach())
        Js.append(jacobian(f, th).reshape(-1, th.numel()))
    return torch.stack(zs), torch.stack(Js)


def module_exact_fisher(model: nn.Module, mods, X: torch.Tensor, family: str) -> torch.Tensor:
    """F = (1/N) Σ_n J_nᵀ F_R(z_n) J_n for any module (its layers' parameters only)."""
    z, J = module_jacobians(model, mods, X)
    return sum(J[n].T @ positionwise_output_fisher(family, z[n]) @ J[n] for n in range(J.shape[0])) / J.shape[0]


def im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches of one case x (C, H, W) by explicit loops over output positions (row-major): (L, C·kh·kw)."""
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    xp = nn.functional.pad(x, (pw, pw, ph, ph))
    H = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            patch = xp[:, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            rows.append(patch.reshape(-1))
    return torch.stack(rows)


def module_uses(model: nn.Module, mods, x: torch.Tensor, family: str):
    """For one case x (batch of 1): z, and per layer the lists over uses of ā_u (a_dim,) and of the
    direction gradients g_u (R, d_out) = Qᵀ ∂z/∂s_u, with F_R(z) = Q Qᵀ from an eigendecomposition."""
    calls = {id(m): [] for m in mods}

    def hook(mod, inputs, output):
        delta = torch.zeros_like(output, requires_grad=True)
        calls[id(mod)].append((inputs[0].detach(), delta))
        return output + delta

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        z = model(x)[0]
    finally:
        for h in handles:
            h.remove()
    ev, U = torch.linalg.eigh(positionwise_output_fisher(family, z.detach()))
    z = z.reshape(-1)
    Q = U * ev.clamp(min=0).sqrt()  # F_R = Q Qᵀ, directions are the columns
    deltas = [d for m in mods for _, d in calls[id(m)]]
    per_dir = [torch.autograd.grad(z @ Q[:, r], deltas, retain_graph=True) for r in range(Q.shape[1])]
    out, i = [], 0
    for m in mods:
        abars, gs = [], []
        for inp, _ in calls[id(m)]:
            grads = torch.stack([p[i] for p in per_dir])[:, 0]  # (R, *out_shape) of this call
            i += 1
            if isinstance(m, nn.Conv2d):
                a = im2col(m, inp[0])
                g = grads.reshape(grads.shape[0], grads.shape[1], -1).transpose(1, 2)  # (R, L, C_out)
            else:
                a = inp[0].reshape(-1, inp.shape[-1])
                g = grads.reshape(grads.shape[0], -1, grads.shape[-1])
            if m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            abars.extend(list(a))
            gs.extend(list(g.transpose(0, 1)))
        out.append((abars, gs))
    return z.detach(), out


def module_kronecker_factors(model: nn.Module, mods, X: torch.Tensor, family: str, approx: str = "expand"):
    """Diagonal factors by definition (Eschenhagen et al. 2023), per layer over its U uses per case:

    expand: A = (1/N) Σ_n (1/U) Σ_u ā_u ā_uᵀ, G = (1/N) Σ_n Σ_u Σ_r g_{u,r} g_{u,r}ᵀ;
    reduce: A = (1/N) Σ_n ā̄ ā̄ᵀ with ā̄ = (1/U) Σ_u ā_u, G = (1/N) Σ_n Σ_r (Σ_u g_{u,r})(Σ_u g_{u,r})ᵀ.
    """
    N = X.shape[0]
    A = {k: 0 for k in range(len(mods))}
    G = {k: 0 for k in range(len(mods))}
    for n in range(N):
        _, per_layer = module_uses(model, mods, X[n:n + 1], family)
        for k, (abars, gs) in enumerate(per_layer):
            U = len(abars)
            if approx == "expand":
                A[k] = A[k] + sum(torch.outer(a, a) for a in abars) / U
                G[k] = G[k] + sum(g.T @ g for g in gs)
            else:
                am = sum(abars) / U
                gsum = sum(gs)
                A[k] = A[k] + torch.outer(am, am)
                G[k] = G[k] + gsum.T @ gsum
    return {(k, k): A[k] / N for k in A}, {(k, k): G[k] / N for k in G}


def module_empirical_fisher(model: nn.Module, mods, X: torch.Tensor, y: torch.Tensor, family: str) -> torch.Tensor:
    """(1/N) Σ_n ∇L_n ∇L_nᵀ with L_n = Σ_t L(y_{n,t}, z_{n,t}) summed over the output's positions."""
    from torch.func import functional_call

    rows = []
    for n in range(X.shape[0]):
        th = module_theta(mods).requires_grad_(True)
        z = functional_call(model, module_params(model, mods, th), (X[n:n + 1],))[0]
        zs = z.reshape(-1, z.shape[-1])
        ys = y[n].reshape(zs.shape[0], -1).squeeze(-1) if family == "categorical" else y[n].reshape(zs.shape)
        L = sum(loss(family, zs[t], ys[t]) for t in range(zs.shape[0]))
        (g,) = torch.autograd.grad(L, th)
        rows.append(g)
    return sum(torch.outer(g, g) for g in rows) / len(rows)
