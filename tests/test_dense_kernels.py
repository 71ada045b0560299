"""The dense kernels at the sizes where their fast paths run (many blocks of rows, prune's sampled
bracket, several threads, ΔW from low-rank factors never formed whole), against oracles written
out plainly on the whole matrix: a stable sort for prune, PEFT's merge_utils for TIES, a dense SVD
for the rank reduction. The fixture adapters' layers are too small to reach these paths."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from pemlang.backend import dense
from pemlang.backend.dense import Rows, blocks, cuts, dare, keep_count, prune, ties, truncated_svd

CPU = torch.device("cpu")
SHAPE = (1200, 1000)  # 1.2 M entries: above dense.SAMPLED, 5 blocks of rows


def low_rank(seed: int, shape: tuple[int, int] = SHAPE, rank: int = 8, weight: float = 1.0) -> Rows:
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(shape[0], rank, generator=generator) * weight
    a = torch.randn(rank, shape[1], generator=generator) / 30
    return Rows(shape, CPU, (b, a))


def oracle_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌈d·n⌉ largest magnitudes, the first by flat index among equal ones: a stable sort."""
    keep = keep_count(density, x.numel())
    order = torch.sort(x.abs().flatten(), descending=True, stable=True).indices[:keep]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order] = True
    return torch.where(mask.view(x.shape), x, torch.zeros(()))


def test_the_sizes_reach_the_fast_paths() -> None:
    assert SHAPE[0] * SHAPE[1] >= dense.SAMPLED
    assert len(blocks(SHAPE, CPU)) > 2


@pytest.mark.parametrize("density", [0.2, 0.05, 0.5, 0.999, 1e-6])
def test_prune_of_factors_equals_the_stable_sort_oracle(density: float) -> None:
    x = low_rank(1)
    whole = x.whole(1)  # the same blocks, formed whole: bit for bit what the kernel sees
    expected = oracle_prune(whole, density)
    assert torch.equal(prune(x, density), expected)
    assert torch.equal(prune(whole, density), expected)
    assert int(torch.count_nonzero(expected)) == keep_count(density, whole.numel())


def test_prune_breaks_ties_at_the_threshold_by_position() -> None:
    """Many equal magnitudes (small integers): the threshold value is shared by thousands of entries
    spread over every block; the first by flat index are kept."""
    values = torch.randint(-6, 7, SHAPE, generator=torch.Generator().manual_seed(2)).float()
    for density in (0.2, 0.37, 0.6):
        assert torch.equal(prune(values, density), oracle_prune(values, density)), density


def test_prune_when_the_sample_misses_the_threshold() -> None:
    """Large entries only where the strided sample never looks: the bracket is wrong, the kernel
    notices (the counts do not straddle the rank) and selects over everything."""
    numel = SHAPE[0] * SHAPE[1]
    step = numel // (1 << 16)
    values = torch.rand(numel, generator=torch.Generator().manual_seed(3))
    hidden = torch.ones(numel, dtype=torch.bool)
    hidden[::step] = False
    values[hidden] += 10  # the sample sees only the small ones
    values = values.view(SHAPE)
    assert torch.equal(prune(values, 0.3), oracle_prune(values, 0.3))


def test_ties_of_factors_equals_peft_merge_utils() -> None:
    xs = [low_rank(4, weight=0.5), low_rank(5, weight=0.3), low_rank(6, weight=0.2)]
    expected = merge_utils.ties(torch.stack([x.whole(1) for x in xs]), torch.ones(3), density=0.2,
                                majority_sign_method="total")
    assert torch.allclose(ties(xs, 0.2, "total"), expected, atol=1e-7, rtol=1e-5)


def test_ties_over_dense_and_low_rank_parts() -> None:
    """An argument that is a sum of another function's dense result and low-rank terms."""
    pruned = prune(low_rank(7), 0.5)
    mixed = Rows(SHAPE, CPU, low_rank(8).low, [(0.5, pruned)])
    whole = mixed.whole(1)
    assert torch.allclose(whole, 0.5 * pruned + low_rank(8).whole(1), atol=1e-7)
    other = low_rank(9).whole(1)
    expected = merge_utils.ties(torch.stack([whole, other]), torch.ones(2), density=0.3, majority_sign_method="total")
    assert torch.allclose(ties([mixed, other], 0.3, "total"), expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["prune", "dare", "ties-total", "ties-frequency", "svd"])
def test_the_bytes_do_not_depend_on_the_thread_count(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dense, "PRODUCT_BLOCK", 1 << 17)  # the range finder's products in 10 blocks
    xs = [low_rank(10), low_rank(11), low_rank(12)]

    def run(workers: int) -> list[torch.Tensor]:
        if kernel == "prune":
            return [prune(xs[0], 0.2, workers=workers)]
        if kernel == "dare":
            return [dare(xs[0], 0.7, 5, "model.layers.0.mlp", workers=workers)]
        if kernel == "svd":
            return list(truncated_svd(xs[0].whole(1) + 0.01 * xs[1].whole(1), 16, "layer", workers=workers))
        return [ties(xs, 0.2, kernel.split("-")[1], workers=workers)]

    one = run(1)
    for workers in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(one, run(workers), strict=True)), workers


def test_cuts_of_several_arguments_are_each_ones_own() -> None:
    xs = [low_rank(13), low_rank(14, weight=100.0), low_rank(15, weight=1e-3)]
    keep = keep_count(0.25, xs[0].numel)
    together = cuts(xs, keep, 2)
    for x, cut in zip(xs, together, strict=True):
        (alone,) = cuts([x], keep, 1)
        assert cut.threshold == alone.threshold
        block = x.whole(1).clone()
        assert int(torch.count_nonzero(cut.apply(block, 0))) == keep


def test_non_finite_entries_reach_the_result() -> None:
    """NaN and ±inf are not dropped by the trimming: the result's finiteness check reports them."""
    values = low_rank(16).whole(1).clone()
    values[5, 7], values[900, 3] = float("nan"), float("inf")
    assert not bool(torch.isfinite(prune(values, 0.2)).all())
    assert not bool(torch.isfinite(ties([values, low_rank(17)], 0.2, "total")).all())


SPECTRA = {
    "flat": lambda j: torch.ones_like(j),
    "j^-0.25": lambda j: j ** -0.25,
    "j^-1": lambda j: 1 / j,
    "j^-2": lambda j: j ** -2.0,
    "plateau across the cut": lambda j: torch.where(j <= 14, 1.0, torch.where(j <= 24, 0.99, 0.5 * j ** -0.3)),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_truncated_svd_stays_within_one_percent_on_hard_spectra(spectrum: str) -> None:
    """The range finder stops iterating when the captured energy settles: on spectra with slow
    decay, flat stretches and a plateau across the cut, the rank-16 error is within 1 % of a dense
    SVD's (the spec's bound)."""
    generator = torch.Generator().manual_seed(18)
    m, n = 700, 500
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    s = SPECTRA[spectrum](torch.arange(1, n + 1, dtype=torch.float64))
    matrix = ((u * s) @ v.T).float()
    a, b = truncated_svd(matrix, 16, "layer")
    singular = torch.linalg.svdvals(matrix.double())
    optimal = float(singular[16:].norm() / singular.norm())
    error = float((matrix.double() - b.double() @ a.double()).norm() / matrix.double().norm())
    assert error <= optimal * 1.01, (error, optimal)


def test_results_written_into_reused_memory_are_the_fresh_ones() -> None:
    """The backend hands a layer's dense results back for the next layer's: every entry is
    written, nothing of the previous contents survives."""
    pool = dense.Pool()
    fresh = {
        "ties": ties([low_rank(20), low_rank(21)], 0.3, "frequency"),
        "prune": prune(low_rank(22), 0.1),
        "dare": dare(low_rank(23), 0.4, 1, "layer"),
    }
    stale = torch.full(SHAPE, float("nan"))
    pool.give([stale])
    memory = pool.take(SHAPE, CPU)
    assert memory is stale and pool.take(SHAPE, CPU) is not stale
    assert torch.equal(ties([low_rank(20), low_rank(21)], 0.3, "frequency", out=memory), fresh["ties"])
    assert torch.equal(prune(low_rank(22), 0.1, out=memory.fill_(float("nan"))), fresh["prune"])
    assert torch.equal(dare(low_rank(23), 0.4, 1, "layer", out=memory.fill_(float("inf"))), fresh["dare"])
    with pytest.raises(ValueError, match="out must be"):
        prune(low_rank(22), 0.1, out=torch.empty(10, 10))


def test_the_mean_of_huge_agreeing_values_does_not_overflow() -> None:
    """TIES' mean of values near fp32's largest is finite although their sum is not."""
    x = low_rank(24).whole(1)
    x = x * (2e38 / float(x.abs().max()))
    assert torch.equal(ties([x, x], 0.3, "total"), prune(x, 0.3))
    assert torch.isfinite(ties([x, 0.5 * x, x], 0.3, "frequency")).all()


def test_svd_converges_whatever_the_scale() -> None:
    """‖ΔW‖² is summed in fp64: for entries of 1e19 (squares beyond fp32) the range finder still
    sees convergence and keeps iterating, the error stays the unit-scale one."""
    generator = torch.Generator().manual_seed(25)
    u, _ = torch.linalg.qr(torch.randn(700, 700, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(900, 700, generator=generator, dtype=torch.float64))
    s = torch.where(torch.arange(700) < 170, 1.0, 0.9).double()
    matrix = ((u * s) @ v.T).float()
    singular = torch.linalg.svdvals(matrix.double())
    optimal = float(singular[170:].norm() / singular.norm())
    ratios = []
    for scale in (1.0, 1e19):
        a, b = truncated_svd(matrix * scale, 170, "layer")
        error = float((matrix.double() * scale - b.double() @ a.double()).norm() / (matrix.double() * scale).norm())
        ratios.append(error / optimal)
    assert ratios[1] <= 1.01 and abs(ratios[1] - ratios[0]) < 1e-3, ratios


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_kernels_take_any_float_dtype(dtype: torch.dtype) -> None:
    x = low_rank(26).whole(1).to(dtype)
    assert torch.equal(prune(x, 0.2), prune(x.float(), 0.2))
    assert torch.equal(ties([x, x], 0.2, "total"), ties([x.float(), x.float()], 0.2, "total"))


@pytest.mark.parametrize("shape", [SHAPE, (3, 7), (1, 300_000)])
def test_dare_is_the_mask_of_one_draw_of_the_whole_shape(shape: tuple[int, int]) -> None:
    """The mask is drawn a block of rows at a time; it is the mask of one draw of the whole layer
    from the (seed, layer) generator, as written out here (and as earlier versions drew it)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(27))
    generator = dense.layer_generator(9, "model.layers.3.mlp.up_proj")
    expected = torch.where(torch.rand(shape, generator=generator) >= 0.6, x * (1 / (1 - 0.6)), torch.zeros(()))
    assert torch.equal(dare(x, 0.6, 9, "model.layers.3.mlp.up_proj"), expected)
