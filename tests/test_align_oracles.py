"""The §2.7 oracles (tests/align_oracles.py) checked against each other and against the SPEC's laws,
before any implementation exists: the SPEC formulas vs the papers' reference computations where they
must agree, the laws (linear E is the exact sum, tsv(x) = x, iso(c·x) = c·iso(x), no dependence on
the signs of singular vectors), and the places where the references differ, asserted as they are."""

from __future__ import annotations

import pytest
import torch
from align_oracles import (
    core_coordinates,
    dare,
    delta,
    knots_coordinates,
    prune,
    reference_core,
    reference_dare,
    reference_iso,
    reference_knots,
    reference_mean,
    reference_sum,
    reference_ties_merging,
    reference_trim,
    reference_tsv,
    spec_core,
    spec_iso,
    spec_knots,
    spec_tsv,
    thin_svd,
    ties,
)


def factors(seed: int, d: int = 32, k: int = 28, ranks: tuple[int, ...] = (3, 5), scalings: tuple[float, ...] = (2.0, 0.5)
            ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, k, generator=generator, dtype=torch.float64),
             torch.randn(d, r, generator=generator, dtype=torch.float64), s)
            for r, s in zip(ranks, scalings, strict=True)]


def close(x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-10) -> bool:
    """Equal to rtol of the larger norm (entry-wise tolerances mean little for a merged matrix)."""
    return float((x - y).norm()) <= rtol * max(float(x.norm()), float(y.norm()), 1e-300)


def masks(shapes: list[torch.Size], p: float, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) >= p for shape in shapes]


# -- §2.5 operators on plain matrices ------------------------------------------------------------------


def test_prune_keeps_the_ceiling_and_breaks_ties_by_flat_index() -> None:
    values = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0]])
    assert prune(values, 0.4).tolist() == [[0.0, -3.0, 3.0, 0.0, 0.0]]
    assert prune(values, 0.5).tolist() == [[0.0, -3.0, 3.0, 0.0, -3.0]]  # ⌈2.5⌉ = 3
    assert int((prune(torch.randn(10, 10, dtype=torch.float64), 0.2) != 0).sum()) == 20  # 0.2 as written


def test_ties_elects_the_sign_and_averages_the_agreeing() -> None:
    x = torch.tensor([[3.0, -1.0, 2.0, 0.0]])
    y = torch.tensor([[-1.0, -2.0, -2.0, 5.0]])
    assert ties([x, y], 1.0, "total").tolist() == [[3.0, -1.5, 0.0, 5.0]]  # 2 − 2 = 0: nothing kept
    assert ties([x, y], 1.0, "frequency").tolist() == [[0.0, -1.5, 0.0, 5.0]]  # one + one −: tie, 0


def test_operators_agree_with_an_entry_by_entry_loop() -> None:
    """prune and ties written once more, one entry at a time in Python (slow, so small)."""
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    xs[1][0, 0] = xs[0][0, 0] = -xs[2][0, 0]  # equal magnitudes: the flat index decides
    for density, sign in ((0.3, "total"), (0.5, "frequency"), (0.75, "total")):
        trimmed = []
        for x in xs:
            flat = x.flatten().tolist()
            keep = -(-round(density * 100) * len(flat) // 100)  # ⌈d·n⌉ in integers
            order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))[:keep]
            trimmed.append([flat[i] if i in order else 0.0 for i in range(len(flat))])
        expected = []
        for values in zip(*trimmed, strict=True):
            vote = sum(values) if sign == "total" else sum((v > 0) - (v < 0) for v in values)
            elected = (vote > 0) - (vote < 0)
            agree = [v for v in values if v and (v > 0) - (v < 0) == elected]
            expected.append(sum(agree) / max(1, len(agree)))
        assert ties(xs, density, sign).flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=0)
        assert prune(xs[0], density).flatten().tolist() == trimmed[0]


def test_operator_laws() -> None:
    generator = torch.Generator().manual_seed(4)
    x, y = (torch.randn(12, 17, generator=generator, dtype=torch.float64) for _ in range(2))
    assert torch.equal(prune(x, 1.0), x)
    assert torch.equal(ties([x], 1.0), x)
    assert torch.equal(dare(x, 0.0, torch.ones_like(x, dtype=torch.bool)), x)
    assert torch.equal(prune(2.5 * x, 0.3), 2.5 * prune(x, 0.3))
    for sign in ("total", "frequency"):
        assert close(ties([x, y, 0.5 * x], 0.4, sign), ties([0.5 * x, y, x], 0.4, sign))


# -- core ------------------------------------------------------------------------------------------------


def test_core_coordinates_are_the_inputs_in_an_orthonormal_basis() -> None:
    fs = factors(0, ranks=(2, 4, 6), scalings=(1.0, 0.25, 3.0))
    u_b, ms, v_a = core_coordinates(fs)
    assert u_b.shape == (32, 12) and v_a.shape == (12, 28) and all(m.shape == (12, 12) for m in ms)
    assert close(u_b.T @ u_b, torch.eye(12)) and close(v_a @ v_a.T, torch.eye(12))
    for f, m in zip(fs, ms, strict=True):
        assert close(u_b @ m @ v_a, delta(f))  # lossless: ΔW_i lies in span(U_B) ⊗ span(V_A)


def test_linear_core_and_knots_are_the_exact_sum() -> None:
    fs = factors(1, ranks=(2, 4, 6), scalings=(1.0, 0.25, 3.0))
    weights = (0.5, -1.5, 0.3)
    expected = sum(w * delta(f) for w, f in zip(weights, fs, strict=True))
    linear = lambda cs: sum(w * c for w, c in zip(weights, cs, strict=True))  # noqa: E731
    assert close(spec_core(fs, linear), expected)
    assert close(spec_knots(fs, linear), expected)


def test_spec_core_is_the_reference_given_the_scaled_matrices() -> None:
    """The reference ignores lora_alpha/r but builds the same basis from the stored factors, so the
    SPEC's M_i are s_i × the reference's, exactly: any E agrees once given s_i·M_i."""
    fs = factors(2, ranks=(3, 5), scalings=(2.0, 0.5))
    pairs = [(a, b) for a, b, _ in fs]
    scaled = lambda e: lambda ms: e([s * m for (_, _, s), m in zip(fs, ms, strict=True)])  # noqa: E731
    for e in (lambda ms: 0.7 * ms[0] - 0.2 * ms[1],
              lambda ms: ties([0.5 * ms[0], 0.3 * ms[1]], 0.2),
              lambda ms: ties(ms, 0.35, "frequency"),
              lambda ms: prune(ms[0] + ms[1], 0.5)):
        assert close(spec_core(fs, e), reference_core(pairs, scaled(e)))


def test_spec_core_is_the_reference_method_for_equal_scalings() -> None:
    """Their setup: one scaling s for all inputs (r = lora_alpha there, s = 1), a method on the
    unweighted M_i, one λ after. mean, sum and TIES in core space are then s × the reference. TIES:
    R² = 64 entries, K = 0.23: int(64·0.23)+1 = 15 = ⌈14.72⌉, the reference keeps what the SPEC keeps."""
    s, lam = 0.5, 0.2
    fs = factors(5, ranks=(3, 5), scalings=(s, s))
    pairs = [(a, b) for a, b, _ in fs]
    assert close(spec_core(fs, lambda ms: lam * sum(ms) / 2), s * reference_core(pairs, reference_mean, scaling=lam))
    assert close(spec_core(fs, lambda ms: lam * sum(ms)), s * reference_core(pairs, reference_sum, scaling=lam))
    ties_merged = spec_core(fs, lambda ms: lam * ties(ms, 0.23))
    assert close(ties_merged, s * reference_core(pairs, lambda ms: reference_ties_merging(ms, 23), scaling=lam))
    assert not close(ties_merged, lam * sum(delta(f) for f in fs), 1e-3)  # TIES is not the sum here


def test_dare_in_core_space_with_the_same_masks() -> None:
    s, p = 1.0, 0.4
    fs = factors(6, ranks=(4, 4), scalings=(s, s))
    kept = masks([torch.Size((8, 8))] * 2, p, seed=9)
    spec = spec_core(fs, lambda ms: sum(dare(m, p, mask) for m, mask in zip(ms, kept, strict=True)))
    assert close(spec, reference_core([(a, b) for a, b, _ in fs], lambda ms: reference_dare(ms, p, kept)))


def test_reference_ties_keeps_one_more_when_the_count_is_whole() -> None:
    """A difference, as it is: topk_values_mask keeps int(n·K)+1 per input, the SPEC ⌈n·K⌉; equal
    when n·K is not a whole number."""
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert int((reference_trim(x, 0.2) != 0).sum()) == 21 and int((prune(x, 0.2) != 0).sum()) == 20
    assert torch.equal(reference_trim(x, 0.234), prune(x, 0.234))  # 23.4: both keep 24
    assert torch.equal(reference_trim(x, 23.4), reference_trim(x, 0.234))  # > 1 is a percentage


# -- knots -----------------------------------------------------------------------------------------------


def test_knots_coordinates_reconstruct_each_input() -> None:
    fs = factors(8, ranks=(2, 3, 4), scalings=(1.0, 2.0, 0.5))
    u, coordinates = knots_coordinates(fs)
    assert u.shape[1] == 9 and all(c.shape == (9, 28) for c in coordinates)  # ρ = R for generic factors
    for f, c in zip(fs, coordinates, strict=True):
        assert close(u @ c, delta(f))


def test_spec_knots_matches_the_references_for_linear_merges() -> None:
    """Linear E: the references' U·S·E(V_i) is the SPEC's U·E(S·V_i). Core space casts the basis to
    float32 (hence the tolerance); fusion_bench keeps fp64 inputs in fp64, with eps 1e-4."""
    fs = factors(10, ranks=(3, 5), scalings=(1.0, 1.0))
    deltas = [delta(f) for f in fs]
    spec = spec_knots(fs, lambda cs: 0.2 * (cs[0] + cs[1]))
    assert close(spec, reference_knots(deltas, reference_sum, scaling=0.2), 1e-6)
    assert close(spec, reference_knots(deltas, reference_sum, eps=1e-4, dtype=torch.float64, scaling=0.2))
    assert close(spec, reference_knots(deltas, reference_sum, scaled=True, dtype=torch.float64, scaling=0.2))


def test_spec_knots_ties_is_knots_own_coordinates_not_core_spaces() -> None:
    """TIES on Σ·V_iᵀ (the SPEC, and SVDMerger.apply_svd) equals the reference on the scaled
    coordinates; core space's get_knots_components (and fusion_bench) trims the unscaled V_iᵀ, which
    is another operator. ρ·k = 8·28 = 224, K = 0.2: int(44.8)+1 = 45 = ⌈44.8⌉."""
    fs = factors(11, ranks=(3, 5), scalings=(1.0, 1.0))
    deltas = [delta(f) for f in fs]
    spec = spec_knots(fs, lambda cs: ties(cs, 0.2))
    ties_20 = lambda vs: reference_ties_merging(vs, 20)  # noqa: E731
    assert close(spec, reference_knots(deltas, ties_20, scaled=True, dtype=torch.float64))
    assert not close(spec, reference_knots(deltas, ties_20, dtype=torch.float64), 1e-2)


# -- tsv -------------------------------------------------------------------------------------------------


def test_tsv_of_one_argument_is_itself_and_keep_truncates() -> None:
    (f,) = factors(12, ranks=(6,), scalings=(0.5,))
    x = delta(f)
    assert close(spec_tsv([f]), x)
    assert close(spec_tsv([x]), x)  # a dense argument: its numerical rank, 6
    u, s, vh = thin_svd(x)
    assert close(spec_tsv([f], keep=0.5), u[:, :3] @ torch.diag(s[:3]) @ vh[:3])  # ⌈0.5·6⌉ = 3
    assert close(spec_tsv([(x, 6)], keep=0.3), u[:, :2] @ torch.diag(s[:2]) @ vh[:2])  # ⌈1.8⌉ = 2


def test_tsv_of_orthogonal_inputs_is_their_sum() -> None:
    """Column and row spaces mutually orthogonal: U and V are already orthonormal, nothing moves."""
    generator = torch.Generator().manual_seed(13)
    q_left = torch.linalg.qr(torch.randn(30, 9, generator=generator, dtype=torch.float64))[0]
    q_right = torch.linalg.qr(torch.randn(26, 9, generator=generator, dtype=torch.float64))[0]
    xs = [q_left[:, :4] @ torch.diag(torch.tensor([5.0, 3, 2, 1], dtype=torch.float64)) @ q_right[:, :4].T,
          q_left[:, 4:] @ torch.diag(torch.tensor([4.0, 2, 2, 1, 0.5], dtype=torch.float64)) @ q_right[:, 4:].T]
    assert close(spec_tsv(xs), xs[0] + xs[1])
    overlapping = factors(14, d=30, k=26, ranks=(4, 5), scalings=(1.0, 1.0))  # generic: they interfere
    assert not close(spec_tsv(overlapping), sum(delta(f) for f in overlapping), 1e-3)


def test_spec_tsv_matches_tsv_m_when_it_keeps_the_ranks() -> None:
    """TSV-M keeps int(min(d, k)/T) components of each input: with 4 inputs of rank 6 in 24×32,
    exactly each input's rank, as the SPEC's keep=1."""
    fs = factors(15, d=24, k=32, ranks=(6, 6, 6, 6), scalings=(1.0, 0.5, 2.0, 1.0))
    assert close(spec_tsv(fs), reference_tsv([delta(f) for f in fs]), 1e-9)


def test_spec_tsv_matches_tsv_in_core_space_for_equal_ranks() -> None:
    """Core space's TSV on the R×R matrices keeps int(R/T) = r of each (equal ranks): mapped back by
    U_B, V_A it is the SPEC's tsv of the inputs (polar(U_B·X) = U_B·polar(X))."""
    s = 0.5
    fs = factors(16, ranks=(3, 3), scalings=(s, s))
    expected = spec_tsv(fs)
    assert close(expected, s * reference_core([(a, b) for a, b, _ in fs], reference_tsv), 1e-9)
    assert close(expected, spec_core(fs, spec_tsv), 1e-9)  # tsv inside core is tsv


# -- iso -------------------------------------------------------------------------------------------------


def test_iso_is_homogeneous_and_flattens_the_spectrum() -> None:
    x = sum(delta(f) for f in factors(17, ranks=(2, 4), scalings=(1.0, 3.0)))
    iso = spec_iso(x)
    for c in (3.7, 0.01, -2.0):  # the SPEC states c > 0; c < 0 holds as well
        assert close(spec_iso(c * x), c * iso)
    s_x, s_iso = thin_svd(x)[1], thin_svd(iso)[1]
    assert close(s_iso[:6], s_x[:6].mean() * torch.ones(6, dtype=torch.float64))
    assert float(s_iso[6:].max()) < 1e-10 * float(s_iso[0])


def test_iso_c_reference_on_full_and_low_rank() -> None:
    """Full rank: Iso-C's code is the SPEC's iso. Rank ρ < min(d, k): the reference spreads the mean
    over all min(d, k) directions; inside x's row and column spaces it is ρ/min(d, k) × the SPEC's."""
    generator = torch.Generator().manual_seed(18)
    full = [torch.randn(20, 20, generator=generator, dtype=torch.float64) for _ in range(2)]
    assert close(reference_iso(full), spec_iso(full[0] + full[1]))
    assert close(reference_iso(full, "mean"), 0.5 * reference_iso(full))
    deltas = [delta(f) for f in factors(19, ranks=(2, 4), scalings=(1.0, 1.0))]
    x = deltas[0] + deltas[1]
    u, _, vh = thin_svd(x)
    inside = u[:, :6] @ u[:, :6].T @ reference_iso(deltas) @ vh[:6].T @ vh[:6]
    assert close(inside, 6 / 28 * spec_iso(x))


def test_isotropize_in_core_space_is_iso_of_core() -> None:
    """Core space's 'isotropize' flattens the R×R merged core; for a linear E that core has full rank R
    and the result is the SPEC's iso(core(E))."""
    fs = factors(20, ranks=(3, 5), scalings=(1.0, 1.0))
    merged = sum(core_coordinates(fs)[1])
    assert float(thin_svd(merged)[1][-1]) > 1e-5 * float(thin_svd(merged)[1][0])
    reference = reference_core([(a, b) for a, b, _ in fs], reference_sum, isotropize=True)
    assert close(reference, spec_iso(spec_core(fs, sum)))


# -- signs of singular vectors ----------------------------------------------------------------------------


def test_results_do_not_depend_on_the_signs_of_singular_vectors() -> None:
    fs = factors(21, ranks=(2, 4, 3), scalings=(1.0, 0.5, 2.0))
    kept = masks([torch.Size((9, 9))] * 3, 0.3, seed=2)
    core_es = (lambda ms: ties([0.5 * ms[0], 0.3 * ms[1], ms[2]], 0.2),
               lambda ms: ties(ms, 0.5, "frequency") - prune(ms[1], 0.1),
               lambda ms: sum(dare(m, 0.3, k) for m, k in zip(ms, kept, strict=True)))
    for e in core_es:
        plain = spec_core(fs, e)
        assert all(close(spec_core(fs, e, flip=seed), plain) for seed in range(3))
    for e in (lambda cs: ties(cs, 0.2), lambda cs: prune(cs[0] - cs[2], 0.3)):
        plain = spec_knots(fs, e)
        assert all(close(spec_knots(fs, e, flip=seed), plain) for seed in range(3))
    for keep in (1.0, 0.5):
        plain = spec_tsv(fs, keep)
        assert all(close(spec_tsv(fs, keep, flip=seed), plain) for seed in range(3))
    x = sum(delta(f) for f in fs)
    assert all(close(spec_iso(x, flip=seed), spec_iso(x)) for seed in range(3))
    # the flips change the coordinates themselves (the check above is not vacuous)
    assert not close(core_coordinates(fs, flip=0)[1][0], core_coordinates(fs)[1][0], 1e-3)
