"""Dense weight updates of one layer: the kernels of `prune`, `dare` and `ties`, and the rank
reduction `svd` applies to a dense ΔW.

On the CPU these passes are bound by memory, not arithmetic: a 5632×2048 ΔW is 46 MB, and each
whole-matrix element-wise operation streams it through the caches again. So they work on blocks of
rows small enough to stay in the cache, with every pass over a block done before the next block,
and a ΔW given as low-rank factors (`Rows`) is never formed whole: each block is computed from the
factors when it is needed (a rank-m product per block costs less than reading the block back from
memory). Blocks are independent, so they run on a pool of threads, one torch thread each. The
partition into blocks is fixed by the shape alone and every reduction over blocks is summed in
block order, so the bytes do not depend on the number of threads. On a GPU a layer is one block.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from ..operators import ceil_share as keep_count  # ⌈d·n⌉ entries kept, d as written

T = TypeVar("T")

BLOCK = 1 << 18  # entries of an element-wise block on the CPU (1 MB in fp32: several fit a core's L2 and L3 share)
PRODUCT_BLOCK = 1 << 20  # entries of a block of the range finder's products (larger: BLAS likes long panels)
SAMPLED = 1 << 18  # from this many entries, a sample brackets prune's threshold


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for a while (a process-wide setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def parallel_map(work: Callable[[T], object], items: Sequence[T], workers: int) -> list:  # type: ignore[type-arg]
    """work(item) for every item, in order, on up to `workers` threads each running torch with one
    intra-op thread (torch releases the GIL inside its kernels)."""
    if workers <= 1 or len(items) <= 1:
        with threads(1):
            return [work(item) for item in items]
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pemlang-kernel")
            _pool_size = workers
        pool = _pool
    with threads(1):
        return list(pool.map(lambda item: _one_thread(work, item), items))


def _one_thread(work: Callable[[T], object], item: T) -> object:
    """work(item) on a pool thread, with torch (OpenMP and MKL, whose counts are per thread) on one
    thread there: a product split across threads rounds differently (seen on a 16-core machine)."""
    if not getattr(_local, "one_thread", False):  # once per pool thread (the main one is in `threads(1)` now)
        torch.set_num_threads(1)
        _local.one_thread = True
    return work(item)


def runs_of(spans: Sequence[tuple[int, int]], count: int) -> list[Sequence[tuple[int, int]]]:
    """The blocks cut into `count` contiguous runs of (nearly) equal length, in order."""
    count = max(1, min(count, len(spans)))
    bounds = [len(spans) * i // count for i in range(count + 1)]
    return [spans[bounds[i]:bounds[i + 1]] for i in range(count)]


def each_block(work: Callable[[tuple[int, int]], T], spans: Sequence[tuple[int, int]], workers: int) -> list[T]:
    """work(span) for every block, in order: each thread takes a contiguous run of blocks (a
    handful of hand-offs between threads per pass, not one per block)."""
    return [r for run in parallel_map(lambda run: [work(span) for span in run], runs_of(spans, workers), workers)
            for r in run]


_local = threading.local()


def scratch(name: str, shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
    """A per-thread fp32 work buffer of this shape, reused from block to block (an allocation costs
    as much as a pass over the block). Its contents are whatever was last written."""
    numel = math.prod(shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=device)
    buffers: dict[str, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[name] = torch.empty(max(numel, BLOCK), dtype=torch.float32)
    return buffer[:numel].view(shape)


def default_workers() -> int:
    return torch.get_num_threads()


def blocks(shape: tuple[int, int], device: torch.device, size: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of about `size` entries each (at least one row): fixed by the shape,
    so results do not depend on the thread count. A GPU takes the whole matrix at once."""
    rows, cols = shape
    size = size or BLOCK
    if device.type != "cpu" or rows * cols <= size:
        return [(0, rows)]
    step = max(1, size // max(cols, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


class Rows:
    """A dense ΔW of one layer (out × in, fp32) given as Σ beta_i·D_i + B·A, evaluated a block of
    rows at a time: dense parts D_i (results of other functions) and one low-rank part (the
    weighted factors of every low-rank term, stacked), which is never formed whole."""

    def __init__(self, shape: tuple[int, int], device: torch.device,
                 low: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dense: Sequence[tuple[float, torch.Tensor]] = ()):
        self.shape = shape
        self.device = device
        self.low = low  # (B, A): rows × m and m × cols
        self.dense = list(dense)

    @classmethod
    def of(cls, value: torch.Tensor | Rows) -> Rows:
        if isinstance(value, Rows):
            return value
        if value.dim() != 2:
            raise ValueError(f"a weight update is a matrix, not shape {tuple(value.shape)}")
        return cls((value.shape[0], value.shape[1]), value.device, dense=[(1.0, value.float())])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) in fp32: a new tensor, or written into `out`."""
        if self.low is not None:
            b, a = self.low
            out = torch.mm(b[start:stop], a, out=out)
            for beta, value in self.dense:
                out.add_(value[start:stop], alpha=beta)
            return out
        if not self.dense:
            return torch.zeros((stop - start, self.shape[1]), device=self.device) if out is None else out.zero_()
        (first, value), rest = self.dense[0], self.dense[1:]
        out = torch.mul(value[start:stop], first, out=out) if out is not None else value[start:stop] * first
        for beta, value in rest:
            out.add_(value[start:stop], alpha=beta)
        return out

    def sample(self, count: int) -> torch.Tensor:
        """About `count` entries spread over the whole matrix, for estimating its quantiles: every
        row (every k-th when there are more rows than `count`) with its share of the columns, at
        offsets that differ from row group to row group. The rows of a group of 8 share their
        columns, so the low-rank part is a batched product of small blocks, not a gather per entry.
        May round differently from `block` in the last bit."""
        rows, cols = self.shape
        row_index = torch.arange(0, rows, max(1, rows // count), device=self.device)
        group = min(8, len(row_index))
        groups = len(row_index) // group
        row_index = row_index[:groups * group].view(groups, group)
        per_row = max(1, min(cols, count // (groups * group)))
        offsets = (torch.arange(groups, device=self.device) * 7919) % cols
        spread = (torch.arange(per_row, device=self.device) * cols) // per_row
        col_index = (offsets[:, None] + spread[None, :]) % cols  # groups × per_row
        out = torch.zeros((groups, group, per_row), dtype=torch.float32, device=self.device)
        if self.low is not None:
            b, a = self.low
            out += torch.bmm(b[row_index], a[:, col_index].permute(1, 0, 2))
        for beta, value in self.dense:
            out += beta * value[row_index[:, :, None], col_index[:, None, :]]
        return out.view(-1)

    def whole(self, workers: int) -> torch.Tensor:
        """The whole matrix. A lone dense part of weight 1 is returned as is (not a copy)."""
        if self.low is None and len(self.dense) == 1 and self.dense[0][0] == 1:
            return self.dense[0][1]
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)

        def fill(span: tuple[int, int]) -> None:
            out[span[0]:span[1]] = self.block(*span)

        each_block(fill, blocks(self.shape, self.device), workers)
        return out


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: `cuda` is the current CUDA device (`cuda:0` when that is 0)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _result(shape: tuple[int, int], device: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not same_device(out.device, device) \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 {shape} tensor on {device}")
    return out


class Pool:
    """Memory for dense results, handed back when a layer is done and reused by the next: a fresh
    tensor of a layer's size costs a page fault per 4 kB the first time it is written (the
    element-wise passes then spend a third of their time in the kernel). On a GPU torch's own
    caching allocator does this."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.free: list[torch.Tensor] = []

    def take(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        for index, tensor in enumerate(self.free):
            if tuple(tensor.shape) == shape and same_device(tensor.device, device):
                return self.free.pop(index)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        self.free = [t for t in tensors if t.device.type == "cpu"][:self.keep] + self.free
        del self.free[self.keep:]


# -- prune ---------------------------------------------------------------------------------------


class Cut:
    """Where `prune` cuts one ΔW: entries of magnitude below `threshold` go, and so do the entries
    equal to it at the flat indices `drop` (the last ones by position, beyond the ⌈d·n⌉ kept)."""

    def __init__(self, threshold: float, drop: torch.Tensor):
        self.threshold = threshold
        self.drop = drop  # sorted flat indices

    def apply(self, block: torch.Tensor, offset: int) -> torch.Tensor:
        """Trim a block (in place) whose first entry has flat index `offset`. NaN and ±inf stay
        (the result's finiteness check reports them)."""
        keep = torch.abs(block, out=scratch("keep", block.shape, block.device)).ge_(self.threshold)
        block.mul_(keep)  # 1.0 kept, 0.0 not (as floats: far faster than a boolean mask on the CPU)
        if len(self.drop):
            flat = block.view(-1)
            low, high = (int(i) for i in torch.searchsorted(self.drop, torch.tensor(
                [offset, offset + flat.numel()], device=self.drop.device)))
            if high > low:
                flat[self.drop[low:high] - offset] = 0
        return block


def cuts(xs: Sequence[Rows], keep: int, workers: int) -> list[Cut]:
    """For each x, the cut that keeps its `keep` entries largest in magnitude (the first by
    position among equal ones at the threshold). A strided sample brackets the keep-th largest
    magnitude; one pass over the blocks counts the entries above the bracket and gathers those
    inside it, and the exact selection runs over that narrow band. When the bracket misses, over
    all. Each phase runs for every x at once, so the threads share the per-x work too."""
    numel, cols = xs[0].numel, xs[0].shape[1]
    spans = blocks(xs[0].shape, xs[0].device)

    def bracket(x: Rows) -> tuple[float, float]:
        sample = x.sample(1 << 16).abs_()
        size = len(sample)
        rank = size * keep / numel  # where the keep-th largest falls in the sample, from the top
        margin = 6 * math.sqrt(rank + 1) + 16  # 6σ of the sample's count above it, and some
        low = float(torch.kthvalue(sample, max(1, size - int(rank + margin))).values)
        if rank <= margin:
            return low, math.inf
        return low, float(torch.kthvalue(sample, min(size, max(1, size - int(rank - margin) + 1))).values)

    def gather(x: Rows, low: float, high: float, span: tuple[int, int]) -> tuple[int, torch.Tensor]:
        magnitude = x.block(*span, out=scratch("block", (span[1] - span[0], cols), x.device)).abs_()
        over = 0
        if high < math.inf:
            over = int(torch.gt(magnitude, high, out=scratch("over", magnitude.shape, x.device)).sum())
        clamped = torch.clamp(magnitude, low, high, out=scratch("clamped", magnitude.shape, x.device))
        return over, magnitude[clamped == magnitude]  # low ≤ |x| ≤ high (never NaN)

    bands: list[tuple[int, list[torch.Tensor]] | None] = [None] * len(xs)  # (count above, band per block)
    if numel >= SAMPLED:
        brackets = parallel_map(bracket, xs, workers)
        # one task per (x, run of blocks): every thread busy however many xs there are
        runs = runs_of(spans, -(-workers // len(xs)))
        tasks = [(i, run) for i in range(len(xs)) for run in runs]
        parts = parallel_map(lambda task: [gather(xs[task[0]], brackets[task[0]][0], brackets[task[0]][1], span)
                                          for span in task[1]],
                             tasks, workers)
        for i in range(len(xs)):
            mine = [part for task, found in zip(tasks, parts, strict=True) if task[0] == i for part in found]
            above, pieces = sum(p[0] for p in mine), [p[1] for p in mine]
            if above < keep <= above + sum(len(p) for p in pieces):
                bands[i] = (above, pieces)

    def select(i: int) -> Cut:
        x = xs[i]
        above, pieces = bands[i] or (0, [x.block(*span).abs_().view(-1) for span in spans])
        band = torch.cat(pieces)
        wanted = keep - above  # the wanted-th largest of the band
        threshold = torch.kthvalue(band, len(band) - wanted + 1).values
        excess = above + int(torch.count_nonzero(band >= threshold)) - keep  # equal to it, one too many
        drop = torch.zeros(0, dtype=torch.int64, device=x.device)
        if excess > 0:
            # Equal magnitudes at the threshold: the last `excess` by position go. Only the last
            # blocks holding such entries (the band says which) are formed again to find them.
            found: list[torch.Tensor] = []
            for span, piece in zip(reversed(spans), reversed(pieces), strict=True):
                if sum(len(f) for f in found) >= excess:
                    break
                if bool((piece == threshold).any()):
                    magnitude = x.block(*span).abs_().view(-1)
                    found.insert(0, torch.nonzero(magnitude == threshold, as_tuple=True)[0] + span[0] * cols)
            positions = torch.cat(found)
            drop = positions[len(positions) - excess:]
        return Cut(float(threshold), drop)

    return parallel_map(select, range(len(xs)), workers)


def prune(x: torch.Tensor | Rows, density: float, *, workers: int | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ⌈d·n⌉ entries largest in magnitude, zero the rest; among equal magnitudes at the
    threshold, the first by flat index are kept."""
    workers = workers or default_workers()
    rows = Rows.of(x)
    keep = keep_count(density, rows.numel)
    if keep >= rows.numel:
        return rows.whole(workers).clone()
    (where,) = cuts([rows], keep, workers)
    out = _result(rows.shape, rows.device, out)

    def fill(span: tuple[int, int]) -> None:
        out[span[0]:span[1]] = where.apply(rows.block(*span), span[0] * rows.shape[1])

    each_block(fill, blocks(rows.shape, rows.device), workers)
    return out


# -- dare ----------------------------------------------------------------------------------------


def layer_generator(seed: int, layer: str) -> torch.Generator:
    """A CPU generator seeded by (seed, layer key): the same numbers on every device, thread count
    and evaluation order."""
    digest = hashlib.sha256(f"{seed}\0{layer}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def dare(x: torch.Tensor | Rows, p: float, seed: int, layer: str, *, workers: int | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Drop each entry with probability p (a mask drawn on the CPU from (seed, layer)) and scale the
    kept ones by 1/(1−p)."""
    workers = workers or default_workers()
    rows = Rows.of(x)
    if p == 0:
        return rows.whole(workers).clone()
    # The mask: uniform numbers drawn in row order from one generator, a block of rows at a time (the
    # same numbers as one draw of the whole shape, without holding them all as floats at once).
    generator = layer_generator(seed, layer)
    kept = torch.empty(rows.shape, dtype=torch.bool)
    for start, stop in blocks(rows.shape, torch.device("cpu")):
        kept[start:stop] = torch.rand((stop - start, rows.shape[1]), generator=generator) >= p
    kept = kept.to(rows.device)
    out = _result(rows.shape, rows.device, out)

    def fill(span: tuple[int, int]) -> None:
        block = rows.block(*span).mul_(1 / (1 - p))
        out[span[0]:span[1]] = block.masked_fill_(~kept[span[0]:span[1]], 0)

    each_block(fill, blocks(rows.shape, rows.device), workers)
    return out


# -- ties ----------------------------------------------------------------------------------------


def ties(xs: Sequence[torch.Tensor | Rows], density: float, sign: str, *, workers: int | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES: trim each to density d; elect a sign per entry (of the sum, "total", or of the sum of
    signs, "frequency"); the mean of the trimmed values that are non-zero and agree with it. Block
    by block: each argument's block is computed, trimmed, voted on and averaged while in the cache."""
    workers = workers or default_workers()
    args = [Rows.of(x) for x in xs]
    shape, device = args[0].shape, args[0].device
    keep = keep_count(density, args[0].numel)
    trims: list[Cut | None] = list(cuts(args, keep, workers)) if keep < args[0].numel else [None] * len(args)
    out = _result(shape, device, out)

    def fill(span: tuple[int, int]) -> None:
        size = (span[1] - span[0], shape[1])
        trimmed = []
        votes = scratch("votes", size, device)
        for number, (arg, where) in enumerate(zip(args, trims, strict=True)):
            block = arg.block(*span, out=scratch(f"argument{number}", size, device))
            if where is not None:
                where.apply(block, span[0] * shape[1])
            trimmed.append(block)
            vote = block if sign == "total" else torch.sign(block, out=scratch("sign", size, device))
            if number == 0:
                votes.copy_(vote)
            else:
                votes.add_(vote)
        elected = votes.sign_()  # 0 where the vote ties: no value agrees with it
        total = out[span[0]:span[1]]
        count = scratch("count", size, device)
        agree = scratch("agree", size, device)
        for number, block in enumerate(trimmed):
            torch.mul(block, elected, out=agree).gt_(0)  # 1.0 where non-zero and of the elected sign
            if number == 0:
                torch.mul(block, agree, out=total)
                count.copy_(agree)
            else:
                total.addcmul_(block, agree)
                count.add_(agree)
        count.clamp_(min=1)
        if math.isfinite(float(total.sum())):
            total.div_(count)
        else:  # the sum overflowed fp32 (or an argument is not finite): the mean, from an fp64 sum
            exact = torch.zeros(size, dtype=torch.float64, device=device)
            for block in trimmed:
                exact.addcmul_(block.double(), torch.mul(block, elected).gt_(0).double())
            total.copy_(exact.div_(count))

    each_block(fill, blocks(shape, device), workers)
    return out


# -- rank reduction of a dense ΔW ----------------------------------------------------------------


def _times(delta: torch.Tensor, right: torch.Tensor, spans: list[tuple[int, int]], workers: int) -> torch.Tensor:
    """delta @ right, by blocks of rows."""
    if len(spans) == 1:
        return delta @ right
    return torch.cat(each_block(lambda span: delta[span[0]:span[1]] @ right, spans, workers))


def _times_t(delta: torch.Tensor, left: torch.Tensor, spans: list[tuple[int, int]], workers: int) -> torch.Tensor:
    """deltaᵀ @ left, by blocks of rows: partial products summed in block order."""
    if len(spans) == 1:
        return delta.T @ left
    parts = each_block(lambda span: delta[span[0]:span[1]].T @ left[span[0]:span[1]], spans, workers)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total  # type: ignore[no-any-return]


def column_signs(u: torch.Tensor) -> torch.Tensor:
    """1 × n: the sign of each column's largest-magnitude entry (1 for a zero column), the signs that
    make singular vectors reproducible."""
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))) if u.shape[0] else torch.ones((1, u.shape[1]))
    signs[signs == 0] = 1
    return signs


def signed_factors(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√S·Vᵀ, U·√S) with fixed signs (the largest entry of each left singular vector
    positive), in fp32, so the bytes are reproducible. The singular values are split between the
    factors, so each holds about √ of ΔW's scale and fits a half-precision output where ΔW does."""
    signs = column_signs(left)
    root = s.sqrt()
    return (right * (signs.T * root[:, None])).float(), ((left * signs) * root).float()


def magnitude(delta: torch.Tensor) -> float:
    """max |entry| (NaN when any entry is NaN), without an |ΔW| copy."""
    low, high = torch.aminmax(delta)
    return float(torch.maximum(-low, high))


def _squared_norm(block: torch.Tensor) -> float:
    """‖block‖², summed in fp32 (a tenth of fp64's time), or in fp64 where fp32's squares would
    overflow (entries above ~1e16: convergence would never be seen) or lose the small ones."""
    norm = float(torch.linalg.vector_norm(block))
    if not 1e-10 < norm < 1e15:
        norm = float(torch.linalg.vector_norm(block, dtype=torch.float64))
    return norm * norm


EXACT = 128  # a layer with a side this short is factorised exactly (a dense SVD costs little there)
MIN_POWER, MAX_POWER = 2, 8  # power iterations of the range finder
CONVERGED = 1e-3  # stop once an iteration adds less than this share of the remaining error² to the captured energy


def truncated_svd(delta: torch.Tensor, rank: int, layer: str, *, oversample: int = 10,
                  workers: int | None = None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the best rank-`rank` approximation of a dense ΔW (within a small fraction of
    the optimal error): `truncated_svd_dropped` without the share it dropped."""
    a, b, _ = truncated_svd_dropped(delta, rank, layer, oversample=oversample, workers=workers, scale=scale)
    return a, b


def truncated_svd_dropped(delta: torch.Tensor, rank: int, layer: str, *, energy: float | None = None,
                          oversample: int = 10, workers: int | None = None, scale: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, dropped): B·A the best rank-`rank` approximation of a dense ΔW (within a small
    fraction of the optimal error), and the share of ‖ΔW‖² it does not keep. With `energy`, the
    rank is the smallest (at most `rank`) whose kept share is ≥ `energy`.

    A randomised range finder (Halko, Martinsson & Tropp 2011) with power iterations,
    re-orthonormalised each time, then an exact SVD of the small projection. It iterates until the
    energy the best rank-R truncation inside the subspace captures has settled (at least MIN_POWER,
    at most MAX_POWER times): each iteration's projection QᵀΔ is the product the next one starts
    from, so watching it costs one small SVD. The result is ΔW projected on a subspace, so what it
    keeps of ‖ΔW‖² is exactly the energy captured there, and the dropped share is known without a
    full SVD. With `energy`, the subspace grows (doubling its rank) until it holds the share asked
    for. Small layers are factorised exactly. The test matrix comes from (layer) on the CPU, so the
    result does not depend on the device's random numbers. `delta` is not changed; `scale` is its
    `magnitude` when the caller has it."""
    workers = workers or default_workers()
    rows, cols = delta.shape
    scale = magnitude(delta) if scale is None else scale
    if scale == 0:
        kept = 1 if energy is not None else rank
        return torch.zeros((kept, cols), device=delta.device), torch.zeros((rows, kept), device=delta.device), 0.0
    target = rank if energy is None else min(rank, 32)
    while True:
        width = min(rows, cols, target + max(target, oversample))
        if width >= min(rows, cols) // 2 or min(rows, cols) <= EXACT:
            u, s, vh = torch.linalg.svd(delta.double() / scale, full_matrices=False)
            kept = rank if energy is None else energy_rank(s, energy, rank)
            return (*signed_factors(u[:, :kept], s[:kept] * scale, vh[:kept]), dropped_share(s, kept))
        basis, projection, total, unit = _range(delta, target, width, layer, scale, workers)
        u, s, vh = torch.linalg.svd(projection.T, full_matrices=False)
        if energy is not None and target < rank and float(s[:target].square().sum()) < energy * total:
            target = min(rank, 2 * target)  # the subspace does not hold the share asked for: a larger one
            continue
        kept = rank if energy is None else energy_rank(s[:target], energy, target, total=total)
        captured = float(s[:kept].square().sum())
        dropped = min(max(total - captured, 0.0) / total, 1.0) if total > 0 else 0.0
        return (*signed_factors(basis @ u[:, :kept], s[:kept] * unit, vh[:kept]), dropped)


def _range(delta: torch.Tensor, rank: int, width: int, layer: str, scale: float, workers: int
           ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The range finder of `truncated_svd_dropped`: (basis Q, (QᵀΔ)ᵀ, ‖ΔW‖², the scale the two are
    at), both at unit scale where ΔW's entries would overflow (or lose digits in) fp32."""
    rows, cols = delta.shape
    if not 1e-20 <= scale <= 1e20:
        delta = delta / scale
    else:
        scale = 1.0
    spans = blocks((rows, cols), delta.device, PRODUCT_BLOCK)
    total = sum(each_block(lambda span: _squared_norm(delta[span[0]:span[1]]), spans, workers))  # ‖ΔW‖²
    omega = torch.randn((cols, width), generator=layer_generator(0, layer), dtype=torch.float32).to(delta.device)
    basis, _ = torch.linalg.qr(_times(delta, omega, spans, workers).double())
    captured = -math.inf
    for power in range(MAX_POWER + 1):
        projection = _times_t(delta, basis.float(), spans, workers).double()  # (QᵀΔ)ᵀ: cols × width
        before, captured = captured, float(torch.linalg.svdvals(projection)[:rank].square().sum())
        if power == MAX_POWER or (power >= MIN_POWER and captured - before <= CONVERGED * max(total - captured, 0)):
            break
        back, _ = torch.linalg.qr(projection)
        basis, _ = torch.linalg.qr(_times(delta, back.float(), spans, workers).double())
    return basis, projection, total, scale


def energy_rank(s: torch.Tensor, energy: float, bound: int, *, total: float | None = None) -> int:
    """The smallest rank (1 to `bound`) whose singular values `s` (descending) keep a share ≥
    `energy` of ‖ΔW‖² = Σ s² (or of `total` when the values are only ΔW's leading ones)."""
    cumulative = torch.cumsum(s.double().square(), 0)
    whole = float(cumulative[-1]) if total is None and len(cumulative) else (total or 0.0)
    if not len(cumulative) or whole <= 0:
        return 1
    first = int(torch.searchsorted(cumulative, torch.tensor([energy * whole], dtype=torch.float64,
                                                            device=cumulative.device)).item())
    return max(1, min(first + 1, bound, len(cumulative)))


def dropped_share(s: torch.Tensor, kept: int) -> float:
    """The share of ‖ΔW‖² = Σ s² that its leading `kept` singular values `s` do not keep (0 for ΔW = 0)."""
    squares = s.double().square()
    whole = float(squares.sum())
    return float(squares[kept:].sum()) / whole if whole > 0 else 0.0


Options = dict[str, float | str]


def _prune(args: list[Rows], options: Options, layer: str, workers: int, out: torch.Tensor) -> torch.Tensor:
    return prune(args[0], float(options["density"]), workers=workers, out=out)


def _dare(args: list[Rows], options: Options, layer: str, workers: int, out: torch.Tensor) -> torch.Tensor:
    return dare(args[0], float(options["p"]), int(options["seed"]), layer, workers=workers, out=out)


def _ties(args: list[Rows], options: Options, layer: str, workers: int, out: torch.Tensor) -> torch.Tensor:
    return ties(args, float(options["density"]), str(options["sign"]), workers=workers, out=out)


# (arguments, options, layer key, threads, memory for the result) → the result, in that memory
KERNELS: dict[str, Callable[[list[Rows], Options, str, int, torch.Tensor], torch.Tensor]] = {
    "prune": _prune, "dare": _dare, "ties": _ties}
