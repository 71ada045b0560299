"""The aligned merges on one layer, computed from LoRA factors: the bases of `core` and `knots`, the
inputs' coordinates in them, and the spectral functions `tsv` and `iso` (README "Adapters that do
not share a basis").

Nothing here forms a d×k weight update: a basis comes from thin QRs of the stacked factors and the
SVD of a small core, so a layer costs O((d + k)·R²) for R = Σ r_i. Work is in float64 (the bases'
orthogonality is what the merges rest on); what the element-wise kernels then read is float32.
Singular vectors are given fixed signs (the largest entry of each left vector positive) so the bytes
are reproducible; the results do not depend on those signs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..operators import ceil_share
from .dense import column_signs

DROP = 1e-5  # singular values at or below this share of the largest are dropped (knots, iso)


def thin_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of B·A (B: d×m, A: m×k) in float64, min(d, k, m) components, from thin QRs of the
    two factors and the SVD of the small core (B = Q_b R_b, Aᵀ = Q_a R_a, R_b R_aᵀ = u s vᵀ)."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.T.double())
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def left_vectors(m: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of a tall or wide matrix (d × R → d × min(d, R)), singular values
    descending, with fixed signs."""
    q, r = torch.linalg.qr(m.double())
    u, _, _ = torch.linalg.svd(r, full_matrices=False)
    return fix_signs(q @ u)


def fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Columns with their largest-magnitude entry positive."""
    return u * column_signs(u)


@dataclass
class Space:
    """A basis shared by the inputs of one layer: ΔW = left · C · right for a matrix C of `shape`
    in it (`right` None: the identity), and each input's coordinates C_i as factors (L_i, R_i),
    C_i = L_i·R_i, in float32."""

    left: torch.Tensor  # d × rows
    right: torch.Tensor | None  # cols × k
    shape: tuple[int, int]
    coordinates: list[tuple[torch.Tensor, torch.Tensor]]


def core_space(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> Space:
    """Core Space: U_B = the left singular vectors of [B_1 … B_n], V_A = the right singular vectors of
    [A_1; …; A_n], both from the factors as stored; input i's coordinates are
    M_i = U_Bᵀ (s_i B_i A_i) V_Aᵀ = (U_Bᵀ s_i B_i)(A_i V_Aᵀ), an R×R matrix (R×R at most: min(d, R) ×
    min(k, R) when a side is shorter than R)."""
    u_b = left_vectors(torch.cat([b for _, b, _ in factors], dim=1))  # d × min(d, R)
    v_a = left_vectors(torch.cat([a for a, _, _ in factors], dim=0).T)  # k × min(k, R): V_Aᵀ
    coordinates = [((u_b.T @ (s * b.double())).float(), (a.double() @ v_a).float()) for a, b, s in factors]
    return Space(u_b, v_a.T, (u_b.shape[1], v_a.shape[1]), coordinates)


def knots_space(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> Space:
    """KnOTS: U Σ [V_1ᵀ … V_nᵀ] = the thin SVD of [ΔW_1 … ΔW_n] (ΔW_i = s_i B_i A_i), components with
    σ ≤ DROP·σ_max dropped (rank ρ); input i's coordinates are Σ V_iᵀ (ρ × k). The concatenation is
    [s_1 B_1 … s_n B_n] · blockdiag(A_1 … A_n): with [s_i B_i] = Q_b R_b and each A_iᵀ = Q_i R_i, it
    is Q_b · (R_b · blockdiag(R_iᵀ)) · blockdiag(Q_iᵀ), whose SVD is that of the small middle."""
    q_b, r_b = torch.linalg.qr(torch.cat([s * b.double() for _, b, s in factors], dim=1))
    per_input = [torch.linalg.qr(a.T.double()) for a, _, _ in factors]  # Q_i: k × m_i, R_i: m_i × r_i
    blocks = torch.block_diag(*[r.T for _, r in per_input])  # R × Σ m_i
    u, s, vh = torch.linalg.svd(r_b @ blocks, full_matrices=False)
    rho = significant(s)
    u = q_b @ u[:, :rho]
    signs = column_signs(u)  # fixed on U, and carried over to the rows of Σ Vᵀ
    u, s, vh = u * signs, s[:rho], vh[:rho] * signs[0, :, None]
    coordinates = []
    start = 0
    for q, _ in per_input:
        width = q.shape[1]
        coordinates.append(((s[:, None] * vh[:, start:start + width]).float(), q.T.float()))
        start += width
    return Space(u, None, (rho, factors[0][0].shape[1]), coordinates)


def tsv(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], keep: float
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M: of each argument's thin SVD U_i S_i V_iᵀ the top ⌈f·rank_i⌉ components (those above
    DROP·σ_max at most); U = [U_1 … U_n],
    V = [V_1 … V_n], S = diag(S_1 … S_n); U⊥ = P Qᵀ where U = P Σ Qᵀ (the nearest matrix with
    orthonormal columns), V⊥ likewise; the result U⊥ S V⊥ᵀ, as (U⊥, S, V⊥ᵀ)."""
    # A component of σ = 0 (beyond an argument's true rank, or a zero argument) has arbitrary
    # singular vectors and no weight: it is dropped, or it would bend the others' in U⊥ and V⊥.
    kept = [min(ceil_share(keep, len(s)), significant(s)) for _, s, _ in parts]
    u = torch.cat([u[:, :n] for (u, _, _), n in zip(parts, kept, strict=True)], dim=1)
    s = torch.cat([s[:n] for (_, s, _), n in zip(parts, kept, strict=True)])
    v = torch.cat([vh[:n] for (_, _, vh), n in zip(parts, kept, strict=True)], dim=0).T
    u, vh = nearest_orthonormal(u), nearest_orthonormal(v).T
    if len(s) > min(u.shape[0], vh.shape[1]):
        # More components than the layer has room for (60 arguments of rank 8 in a 32×32 layer):
        # U⊥ S V⊥ᵀ has rank min(d, k) at most, written with that many (operators.low_rank).
        return thin_svd(vh, u * s)
    return u, s, vh


def nearest_orthonormal(m: torch.Tensor) -> torch.Tensor:
    """P Qᵀ for M = P Σ Qᵀ: the matrix with orthonormal columns nearest to M (its polar factor),
    over M's singular values above DROP·σ_max. When M's columns are dependent (tsv(a, a): the same
    U_i twice; more columns than rows) the rest have σ = 0 and arbitrary vectors in P and Q, which
    would add directions that none of the arguments has; without them tsv(a, a) = a."""
    p, sigma, qh = torch.linalg.svd(m, full_matrices=False)
    count = significant(sigma)
    return p[:, :count] @ qh[:count]


def significant(s: torch.Tensor) -> int:
    """How many singular values (descending) are above DROP·σ_max."""
    return int((s > DROP * s[0]).sum()) if len(s) and s[0] > 0 else 0


def iso(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iso-C: singular values at or below DROP·σ_max dropped, the others set to their mean."""
    count = significant(s)
    mean = s[:count].mean() if count else s.new_zeros(())
    return u, torch.where(torch.arange(len(s), device=s.device) < count, mean, s.new_zeros(())), vh


def factorised(left: torch.Tensor, middle: torch.Tensor, right: torch.Tensor | None, rank: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """left · middle · right as U, S, Vᵀ with `rank` components (zeros beyond the middle's own):
    the SVD of the small middle, carried out by the bases."""
    u, s, vh = torch.linalg.svd(middle.double(), full_matrices=False)
    u, s, vh = left @ u[:, :rank], s[:rank], vh[:rank]
    if right is not None:
        vh = vh @ right
    return padded(u, s, vh, rank)


def padded(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ with zero components appended up to `rank` (a layer's rank is fixed by the plan)."""
    missing = rank - len(s)
    if missing > 0:
        u = torch.cat([u, u.new_zeros((u.shape[0], missing))], dim=1)
        s = torch.cat([s, s.new_zeros(missing)])
        vh = torch.cat([vh, vh.new_zeros((missing, vh.shape[1]))], dim=0)
    return u, s, vh
