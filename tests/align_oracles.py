"""Oracles for SPEC §2.7 (merging in a shared basis: `core`, `knots`, `tsv`, `iso`), on dense fp64
matrices, for the tests of pemlang's factor-space implementation.

Two kinds, kept apart:

- `spec_*`: the SPEC's formulas written out plainly (dense SVDs are fine here: these are oracles),
  with §2.5's element-wise operators (`prune`, `ties`, `dare`) on plain matrices so that the
  argument expression E of `core(E)`/`knots(E)` can be given as a Python callable on the list of
  aligned coordinates: `lambda Ms: ties([0.5 * Ms[0], 0.3 * Ms[1]], 0.2)`.
- `reference_*`: what the papers' own code computes per layer, read from their repositories and
  rewritten here in plain code (nothing copied into the package). Each docstring cites
  repository + path + function and lists every place where that code differs from the SPEC.

No pemlang import: torch only, everything in float64 unless a reference itself casts.

Inputs. A LoRA input is a factor triple `(A, B, s)`: A is r×k, B is d×r, s the scaling, so that
ΔW = s·B·A (d×k). The references take what their code takes: raw `(A, B)` pairs or dense ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

Factor = tuple[torch.Tensor, torch.Tensor, float]  # (A r×k, B d×r, s)
Merge = Callable[[list[torch.Tensor]], torch.Tensor]  # E, on the inputs' aligned coordinates
LowRank = Factor | torch.Tensor | tuple[torch.Tensor, int]  # see spec_tsv

DROP = 1e-5  # SPEC §2.7: singular values σ ≤ DROP·σ_max are dropped (knots, iso)


def f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def delta(factor: Factor) -> torch.Tensor:
    """ΔW = s·B·A, dense, fp64."""
    a, b, s = factor
    return s * (f64(b) @ f64(a))


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᴴ with S descending (torch's convention)."""
    return torch.linalg.svd(f64(x), full_matrices=False)


def polar(x: torch.Tensor) -> torch.Tensor:
    """P·Qᵀ from x = P Σ Qᵀ: the nearest matrix with orthonormal columns (rows, if x is wide), over
    x's singular values σ > DROP·σ_max. When x's columns are dependent (tsv(a, a) stacks U_a twice;
    60 arguments of rank 8 in 32 rows) the other σ are 0 and their P, Q columns arbitrary: every
    completion is as near, so the SPEC's "nearest" names none; leaving them out is the one choice
    that adds no direction x lacks (and gives tsv(a, a) = a, tsv(a, −a) = 0)."""
    p, s, qh = thin_svd(x)
    count = int((s > DROP * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return p[:, :count] @ qh[:count]


def signs(count: int, generator: torch.Generator) -> torch.Tensor:
    """Random ±1 (fp64), to flip singular vectors in the sign-invariance checks."""
    return torch.randint(0, 2, (count,), generator=generator).to(torch.float64) * 2 - 1


# -- §2.5 element-wise operators, on plain matrices ------------------------------------------------


def keep_count(density: float, numel: int) -> int:
    """⌈d·n⌉ with d as written in decimal (0.2 of 100 is 20, not the 21 of 0.2's binary value)."""
    return min(numel, math.ceil(Fraction(repr(float(density))) * numel))


def prune(m: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌈d·numel⌉ entries largest in magnitude, zero the rest; among equal magnitudes the
    first by flat (row-major) index are kept."""
    flat = f64(m).flatten()
    keep = keep_count(density, flat.numel())
    # a stable sort of −|x|: largest magnitude first, equal magnitudes in flat-index order
    order = torch.sort(-flat.abs(), stable=True).indices[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view(m.shape)


def ties(ms: Sequence[torch.Tensor], density: float, sign: str = "total") -> torch.Tensor:
    """t_i = prune(m_i, d); elected = sign(Σ t_i) ("total") or sign(Σ sign(t_i)) ("frequency");
    result = Σ_{i∈S} t_i / max(1, |S|), S = the i with t_i ≠ 0 and sign(t_i) = elected (an entry
    whose vote is 0 keeps nothing)."""
    if sign not in ("total", "frequency"):
        raise ValueError(sign)
    trimmed = torch.stack([prune(m, density) for m in ms])
    votes = trimmed.sum(0) if sign == "total" else torch.sign(trimmed).sum(0)
    elected = torch.sign(votes)
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(m: torch.Tensor, p: float, kept: torch.Tensor) -> torch.Tensor:
    """DARE with a given mask: `kept` (bool, m's shape) says which entries survive; the survivors are
    multiplied by 1/(1−p). (How the mask is drawn, from (seed, layer key), is the implementation's.)"""
    return f64(m) * kept.to(torch.float64) / (1 - p)


# -- §2.7 core -------------------------------------------------------------------------------------


def core_coordinates(factors: Sequence[Factor], flip: int | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(U_B, [M_i], V_A): U_B = left singular vectors of [B_1 … B_n] (d×R), V_A = right singular
    vectors of [A_1; …; A_n] (R×k), both from the stored factors (unscaled), singular values
    descending; M_i = U_Bᵀ (s_i B_i A_i) V_Aᵀ (R×R). `flip`: a seed; when given, every column of
    U_B and every row of V_A gets a random sign (another valid SVD)."""
    u_b = thin_svd(torch.cat([f64(b) for _, b, _ in factors], dim=1))[0]
    v_a = thin_svd(torch.cat([f64(a) for a, _, _ in factors], dim=0))[2]
    if flip is not None:
        generator = torch.Generator().manual_seed(flip)
        u_b = u_b * signs(u_b.shape[1], generator)
        v_a = signs(v_a.shape[0], generator)[:, None] * v_a
    return u_b, [u_b.T @ delta(f) @ v_a.T for f in factors], v_a


def spec_core(factors: Sequence[Factor], e: Merge, *, flip: int | None = None) -> torch.Tensor:
    """core(E) per SPEC §2.7: U_B · E(M_1 … M_n) · V_A (d×k, dense)."""
    u_b, ms, v_a = core_coordinates(factors, flip)
    return u_b @ f64(e(ms)) @ v_a


# -- §2.7 knots ------------------------------------------------------------------------------------


def knots_coordinates(factors: Sequence[Factor], flip: int | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U, [Σ V_iᵀ]): the thin SVD U Σ [V_1ᵀ … V_nᵀ] of [ΔW_1 … ΔW_n] (d × n·k, ΔW_i = s_i B_i A_i),
    components with σ ≤ 1e-5·σ_max dropped (rank ρ); input i's coordinates Σ V_iᵀ are ρ×k.
    `flip`: a seed; when given, component j's left and right singular vectors both change sign at
    random (another valid SVD)."""
    deltas = [delta(f) for f in factors]
    k = deltas[0].shape[1]
    u, s, vh = thin_svd(torch.cat(deltas, dim=1))
    kept = s > DROP * s[0]
    u, s, vh = u[:, kept], s[kept], vh[kept]
    if flip is not None:
        d = signs(len(s), torch.Generator().manual_seed(flip))
        u, vh = u * d, d[:, None] * vh
    return u, [s[:, None] * vh[:, i * k:(i + 1) * k] for i in range(len(deltas))]


def spec_knots(factors: Sequence[Factor], e: Merge, *, flip: int | None = None) -> torch.Tensor:
    """knots(E) per SPEC §2.7: U · E(ΣV_1ᵀ … ΣV_nᵀ) (d×k, dense)."""
    u, coordinates = knots_coordinates(factors, flip)
    return u @ f64(e(coordinates))


# -- §2.7 tsv, iso ---------------------------------------------------------------------------------


def dense_and_rank(x: LowRank) -> tuple[torch.Tensor, int]:
    """A tsv argument as (ΔW, rank_i). rank_i is the argument's stored rank:
    - a factor triple (A, B, s): r_i, the rows of A (ΔW = s·B·A);
    - a pair (ΔW, rank): the rank given (e.g. R = Σ r_i for a core(…) value);
    - a dense tensor: its numerical rank, the count of σ > 1e-5·σ_max (equal to the stored rank for
      factors of full rank, which is what the tests use).
    A stored rank above the numerical rank brings components with σ = 0 whose singular vectors are
    arbitrary, and those still enter the polar factors: the result then depends on the basis, in the
    SPEC's formula as in any implementation, so the oracle is meant for full-rank factors."""
    if isinstance(x, torch.Tensor):
        s = thin_svd(x)[1]
        return f64(x), int((s > DROP * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if len(x) == 3:
        return delta(x), x[0].shape[0]  # type: ignore[misc]
    dense, rank = x  # type: ignore[misc]
    return f64(dense), int(rank)


def spec_tsv(args: Sequence[LowRank], keep: float = 1.0, *, flip: int | None = None) -> torch.Tensor:
    """tsv(x_1 … x_n, keep=f) per SPEC §2.7: each argument's thin SVD U_i S_i V_iᵀ, its top
    ⌈f·rank_i⌉ components kept (rank_i: see `dense_and_rank`); U = [U_1 … U_n], V = [V_1 … V_n],
    S = diag(S_1 … S_n); U⊥ = P Qᵀ from U = P Σ Qᵀ, V⊥ likewise; result U⊥ S V⊥ᵀ. (When the kept
    columns outnumber the rows, P Qᵀ has orthonormal rows instead: the same formula.) `flip`: a
    seed; when given, each kept component's u and v change sign together at random."""
    if not 0 < keep <= 1:
        raise ValueError(keep)
    generator = torch.Generator().manual_seed(flip) if flip is not None else None
    us, ss, vs = [], [], []
    for x in args:
        dense, rank = dense_and_rank(x)
        u, s, vh = thin_svd(dense)
        top = keep_count(keep, rank)
        u, s, v = u[:, :top], s[:top], vh[:top].T
        if generator is not None:
            d = signs(top, generator)
            u, v = u * d, v * d
        us.append(u)
        ss.append(s)
        vs.append(v)
    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, dim=1)).T


def spec_iso(x: torch.Tensor, *, flip: int | None = None) -> torch.Tensor:
    """iso(x) per SPEC §2.7: thin SVD U S Vᵀ, σ ≤ 1e-5·σ_max dropped, U · mean(S) · Vᵀ."""
    u, s, vh = thin_svd(x)
    if not s.numel() or s[0] == 0:
        return torch.zeros_like(f64(x))
    kept = s > DROP * s[0]
    u, s, vh = u[:, kept], s[kept], vh[kept]
    if flip is not None:
        d = signs(len(s), torch.Generator().manual_seed(flip))
        u, vh = u * d, d[:, None] * vh
    return s.mean() * (u @ vh)


# == The papers' reference code, per layer ==========================================================
#
# Core Space: apanariello4/core-space-merging @ e66f357, task_merger.py, class MatrixPerLayerMerger
#   (get_core_matrices, get_knots_components, get_tsv_delta_w, _merge_tensors, _process_ties,
#   get_dare_delta_w, merge, _apply_delta) and the module-level isotropize_matrix; merging_functions.py
#   (ties_merging, topk_values_mask, resolve_sign, resolve_zero_signs, disjoint_merge); ft_handlers.py
#   (LoRAHandler.get_ft_parameters / get_ft_ab_parameters: raw B@A and raw (A, B), no lora_alpha/r).
# KnOTS as packaged in FusionBench: tanganke/fusion_bench @ 25c098b, fusion_bench/method/knots/
#   knots_utils.py, subspace_alignment.
# TSV-M: AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction.
# Iso-C: AntoAndGar/task_singular_vectors, src/utils/iso.py, compute_iso_c_task_vector (mean of the
#   task vectors); danielm1405/iso-merging's own src/ is not in the stored copy (only README and
#   configs): its fork NiccoloSicilian/iso-merging, src/utils/iso.py, iso_c, shows the sum (mean ×
#   number of tasks) before the SVD; that fork's stored iso_c otherwise replaces mean(S) by its own
#   constant, so only the sum is taken from it.


def reference_isotropize(matrix: torch.Tensor) -> torch.Tensor:
    """core-space-merging task_merger.py, isotropize_matrix (also VectorMerger/SVDMerger.merge's
    'isotropize' loop): thin SVD in fp64, every singular value replaced by the mean of all
    min(rows, cols) of them, U·diag·Vᴴ. No threshold: for a rank-deficient matrix the σ≈0
    directions (whose singular vectors are arbitrary) get the mean too. Differs from `spec_iso`."""
    u, s, vh = thin_svd(matrix)
    return u @ torch.diag(s.mean() * torch.ones_like(s)) @ vh


def reference_trim(stacked: torch.Tensor, top_k: float) -> torch.Tensor:
    """merging_functions.py, topk_values_mask, on an (inputs × entries) matrix, one row per input.
    top_k > 1 is read as a percentage (10 → 0.1); ≥ 1 keeps everything. Otherwise, per row,
    k = N − int(N·K) and every entry with |x| ≥ the k-th smallest magnitude is kept: int(N·K)+1
    entries (not the SPEC's ⌈N·K⌉: one more when N·K is a whole number), and every entry tied at
    the threshold (the SPEC keeps the first by flat index)."""
    k_fraction = top_k / 100 if top_k > 1 else top_k
    if k_fraction >= 1:
        return stacked
    n = stacked.shape[1]
    kth = stacked.abs().kthvalue(n - int(n * k_fraction), dim=1, keepdim=True).values
    return stacked * (stacked.abs() >= kth)


def reference_ties_merging(tensors: Sequence[torch.Tensor], top_k: float = 10) -> torch.Tensor:
    """task_merger.py MatrixPerLayerMerger._process_ties → merging_functions.ties_merging with its
    defaults (merging_type 'mean', no weights): each tensor flattened, one row per input; trimmed by
    `reference_trim`; sign = sign(Σ rows), entries where that is 0 take the majority sign
    sign(Σ of all elected signs) (resolve_zero_signs; SPEC: nothing kept there); kept = the entries
    whose sign is the elected one (elected > 0: x > 0, otherwise x < 0); mean over the non-zero kept
    (disjoint_merge 'mean', the SPEC's Σ_S t_i / max(1, |S|)). No weights inside: the reference
    multiplies the merged layer by one coefficient afterwards (see `reference_core`)."""
    shape = tensors[0].shape
    stacked = torch.stack([t.flatten() for t in tensors])
    trimmed = reference_trim(stacked, top_k)
    elected = torch.sign(trimmed.sum(dim=0))
    elected[elected == 0] = torch.sign(elected.sum())
    kept = torch.where(elected[None] > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * kept
    counts = (selected != 0).sum(dim=0).to(selected.dtype)
    return (selected.sum(dim=0) / counts.clamp(min=1)).reshape(shape)


def reference_dare(tensors: Sequence[torch.Tensor], p: float, kept: Sequence[torch.Tensor],
                   merge: bool = True) -> torch.Tensor:
    """task_merger.py MatrixPerLayerMerger.get_dare_delta_w: each tensor times its 0/1 mask, divided
    by (1−p), then summed (merge=True, the 'dare' method) or stacked. The reference draws each mask
    with randbin, `torch.randint(2, shape).bernoulli(1−p)` on the global RNG (i.i.d. keep with
    probability 1−p); here the masks are given. Its weights are not inside (one λ after), and it
    reassigns the entries of the cached list it is given, so with MatrixPerLayerMerger's cache a
    second merge of the same layer drops entries from already-dropped matrices (not reproduced:
    this oracle is one call)."""
    dropped = [f64(t) * f64(m) / (1 - p) for t, m in zip(tensors, kept, strict=True)]
    return torch.stack(dropped).sum(dim=0) if merge else torch.stack(dropped)


def reference_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """_merge_tensors 'mean'."""
    return torch.stack(list(tensors)).mean(dim=0)


def reference_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """_merge_tensors 'sum' / 'tv'."""
    return torch.stack(list(tensors)).sum(dim=0)


def reference_core(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], merge: Merge, *,
                   isotropize: bool = False, scaling: float = 1.0) -> torch.Tensor:
    """core-space-merging task_merger.py, MatrixPerLayerMerger.get_core_matrices then merge() with
    merge_space 'core' and _apply_delta, for one layer. `pairs` = the stored (A_i, B_i).

    A_stack = [A_1; …] (rows), B_stack = [B_1 … ] (columns); Vh_A_ref, U_B_ref from their fp64 thin
    SVDs; per input, from the thin SVDs A = U_A S_A Vh_A and B = U_B S_B Vh_B:
    M_i = (U_B_refᵀ U_B)·(S_B Vh_B U_A S_A)·(Vh_A Vh_A_refᵀ) = U_B_refᵀ B_i A_i Vh_A_refᵀ (their own
    comment gives the latter as "the optimized version"); M = merge(M_1 …) (one of _merge_tensors'
    methods, e.g. `reference_mean`, `reference_ties_merging`, `reference_dare`, `reference_tsv`);
    optionally isotropize_matrix(M); ΔW = U_B_ref M Vh_A_ref; the model gets scaling·ΔW.

    Differences from SPEC §2.7 `core`:
    - No LoRA scaling: ΔW_i = B_i A_i (LoRAHandler returns the raw factors). The basis is the same
      (both from the factors as stored), so the SPEC's M_i = s_i × the reference's M_i exactly: the
      two agree for every E when E is given the s_i-scaled matrices, and, for E positively
      homogeneous (linear, prune, ties, tsv), up to the factor s when all s_i = s (their configs:
      r = lora_alpha = 16, s = 1).
    - E is a named method over unweighted M_i and one coefficient λ (scaling_coeffs) multiplies the
      result: no weights inside, no expression. Its 'ties' is `reference_ties_merging` (keeps
      int(n·K)+1 entries per input, ties at the threshold all kept, zero votes take the majority
      sign), its 'dare' draws masks from the global RNG and sums, its 'tsv' keeps int(R/T) components
      of each R×R M_i (`reference_tsv`).
    - 'isotropize' flattens the R×R merged core over all R singular values, no threshold (equal to
      the SPEC's iso(core(E)) when the merged core has full rank R).
    - _apply_delta casts ΔW to the parameter's dtype (fp32 in their runs); kept in fp64 here."""
    a_list = [f64(a) for a, _ in pairs]
    b_list = [f64(b) for _, b in pairs]
    vh_a_ref = thin_svd(torch.cat(a_list, dim=0))[2]
    u_b_ref = thin_svd(torch.cat(b_list, dim=1))[0]
    ms = []
    for a, b in zip(a_list, b_list, strict=True):
        u_a, s_a, vh_a = thin_svd(a)
        u_b, s_b, vh_b = thin_svd(b)
        core = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        ms.append((u_b_ref.T @ u_b) @ core @ (vh_a @ vh_a_ref.T))
    merged = f64(merge(ms))
    if isotropize:
        merged = reference_isotropize(merged)
    return scaling * (u_b_ref @ merged @ vh_a_ref)


def reference_knots(deltas: Sequence[torch.Tensor], merge: Merge, *, eps: float = 1e-5,
                    scaled: bool = False, dtype: torch.dtype = torch.float32, isotropize: bool = False,
                    scaling: float = 1.0) -> torch.Tensor:
    """KnOTS as the references compute it per layer, from dense task vectors `deltas` (d×k each).

    core-space-merging task_merger.py, MatrixPerLayerMerger.get_knots_components + merge() with
    merge_space 'knots' (the defaults here: eps=1e-5, scaled=False, dtype=float32): the fp64 thin SVD
    of [ΔW_1 … ΔW_n] (torch.cat dim=1); components with S > eps kept; U, S, Vh cast to float32;
    Vs = the column blocks of Vh (einops 'Tr (b c) -> b Tr c'), V_iᵀ unscaled; ΔW = U·diag(S)·merge(Vs),
    optionally isotropize_matrix(ΔW); the model gets scaling·ΔW.
    fusion_bench knots_utils.py, subspace_alignment: the same basis with eps=1e-4 and, by default, an
    fp64 SVD cast back to the inputs' dtype (dtype=the inputs' dtype here).
    scaled=True: the coordinates diag(S)·V_iᵀ of SVDMerger.apply_svd (KnOTS's own merger, kept in
    the same task_merger.py; s_model = s/s = 1 so nothing rescales after the merge): ΔW = U·merge(SVs).
    Not reproduced: SVDMerger's mask step (get_mask_fn / masking_ops, absent from the stored copy),
    which works on the whole model's concatenated vector rather than per layer.

    Differences from SPEC §2.7 `knots`:
    - threshold: absolute S > 1e-5 (core space) or > 1e-4 (fusion_bench), not σ ≤ 1e-5·σ_max;
      the same set when the nonzero σ are well above it and the numerical zeros well below.
    - scaled=False (MatrixPerLayerMerger, fusion_bench): E acts on V_iᵀ, Σ applied after. Linear E
      gives the same ΔW as the SPEC's E(ΣV_iᵀ); prune/ties/dare do not (they rank and drop entries
      of unit-norm rows, not of ΣV_iᵀ). scaled=True is the SPEC's coordinates.
    - no LoRA scaling (task vectors are B@A); float32 basis in core space; 'isotropize' works on the
      dense d×k ΔW over all min(d, k) singular values (arbitrary directions for rank < min(d, k);
      see `reference_iso`), not the SPEC's iso(knots(E))."""
    stacked = torch.cat([f64(x) for x in deltas], dim=1)
    k = deltas[0].shape[1]
    u, s, vh = thin_svd(stacked)
    kept = s > eps
    u, s, vh = u[:, kept].to(dtype), s[kept].to(dtype), vh[kept].to(dtype)
    vs = [vh[:, i * k:(i + 1) * k] for i in range(len(deltas))]
    # scaled: E on diag(S)·V_iᵀ, U after; otherwise E on V_iᵀ, U·diag(S) after
    result = f64(u @ merge([torch.diag(s) @ v for v in vs]) if scaled else u @ torch.diag(s) @ merge(vs))
    if isotropize:
        result = reference_isotropize(result)
    return scaling * result


def reference_tsv(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M, per layer: AntoAndGar/task_singular_vectors src/utils/TSVM_utils.py,
    compute_and_sum_svd_mem_reduction; core-space-merging's MatrixPerLayerMerger.get_tsv_delta_w
    computes the same (in fp64; the TSV repo in the inputs' dtype; fp64 here).

    With T = len(tensors), each tensor's thin SVD (min(d, k) components) and
    reduced = int(min(d, k) · (1/T)) components kept from each, placed side by side in zero-padded
    d × min(d, k), min(d, k), min(d, k) × k arrays; U⊥ = u_u·v_u and V⊥ = u_v·v_v from the SVDs of
    those arrays (the polar factors; the zero padding meets zero singular values and drops out);
    result U⊥ diag(s) V⊥.

    Differences from SPEC §2.7 `tsv`:
    - how many components: int(min(d, k)/T) from every input, fixed by the shape and the number of
      inputs, not ⌈f·rank_i⌉. For a LoRA ΔW of rank r_i below that number, the extra components have
      σ ≈ 0 and arbitrary singular vectors, which still enter the polar factors: the result then
      depends on the SVD's choice of basis. They agree (SPEC keep=1) when int(min(d, k)/T) = r_i for
      every input: dense ΔW with min(d, k) = T·r, or core space's R×R matrices with equal ranks
      (R = T·r). When it is below r_i the reference truncates (SPEC: keep = that count / r_i)."""
    count = len(tensors)
    sv_reduction = 1 / count
    sum_u = sum_s = sum_v = None
    for i, x in enumerate(tensors):
        u, s, v = thin_svd(x)
        if sum_u is None:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        reduced = int(s.shape[0] * sv_reduction)
        sum_u[:, i * reduced:(i + 1) * reduced] = u[:, :reduced]
        sum_s[i * reduced:(i + 1) * reduced] = s[:reduced]
        sum_v[i * reduced:(i + 1) * reduced, :] = v[:reduced, :]
    u_u, _, v_u = thin_svd(sum_u)
    u_v, _, v_v = thin_svd(sum_v)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def reference_iso(tensors: Sequence[torch.Tensor], combine: str = "sum") -> torch.Tensor:
    """Iso-C, per layer: the task vectors combined ('sum': iso-merging's iso_c, the sum as mean × T;
    'mean': the TSV repo's compute_iso_c_task_vector), thin SVD, every singular value replaced by
    their mean, U·diag·Vᴴ (the SVD in the inputs' dtype there; fp64 here).

    Differences from SPEC §2.7 `iso` (which is applied to one value, e.g. iso(a + b)):
    - 'sum' vs 'mean' differ by the factor T, which the tuned coefficient absorbs.
    - no threshold: the mean is over all min(d, k) singular values and every singular direction,
      σ ≈ 0 ones included, gets it. On a full-rank ΔW (full fine-tuning, the paper's setting) this is
      the SPEC's iso. On a ΔW of rank ρ < min(d, k) (any LoRA sum) the result is full rank with
      arbitrary directions outside ΔW's row and column spaces; inside them it is
      (ρ / min(d, k)) × the SPEC's iso (a smaller, flattened spectrum)."""
    if combine not in ("sum", "mean"):
        raise ValueError(combine)
    stacked = torch.stack([f64(x) for x in tensors])
    total = stacked.sum(dim=0) if combine == "sum" else stacked.mean(dim=0)
    u, s, vh = thin_svd(total)
    return torch.einsum("ij,j,jk->ik", u, s.mean() * torch.ones_like(s), vh)
