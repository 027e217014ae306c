"""The one door to the compiled selectivity ops (csrc/, loaded as ``selectivity._C``).

Each op has a pure-PyTorch reference below that computes the same thing in float64.

The tracker's ops work on one flat, **tiled** state for all tracked layers (``new_tiled_state``):
``sums [R, tiles, K, T]`` float64 (row r of the label matrix, T units per tile, each tile's K x T
block contiguous) and ``counts [R, K]`` float64 (decayed counts need a float):

* ``accumulate_means(means, labels, sums, counts, weight, cache, rescans)``: one step of every layer:
  ``means [B, N]`` float32 (the per-image means of all N tracked units), ``labels [R, B]`` int64 (row 0
  the real labels, rows 1.. the null's); adds ``weight * means[b]`` into class ``labels[r, b]`` of row
  r and ``weight`` into its count. With ``cache`` (``new_index_cache``) row 0's per-unit μ_max,
  preferred class and sum of class means are kept up to date in O(B·N): a tile is rescanned only when
  a unit's preferred class fell below the bound of the others (``rescans[0]`` counts those units,
  ``rescans[1]`` the calls).
* ``index_cache(sums[r], counts[r])``: the same per-unit values from scratch (the full reduction;
  ``bounds=False``: only μ_max, the preferred class and the sum of class means, what SI needs);
  ``si_from_cache`` turns either into ``SIResult`` on the state's device, without a host sync, and
  ``layer_si_means`` into each layer's mean SI in one op (the per-step SI; a loop on the CPU).

The per-layer ops, used by the analyses and the regularizer's tests:

* ``accumulate(act, labels, sums, counts)``: for an activation ``[B, U, H, W]`` (NCHW or
  channels_last) or ``[B, U]`` in float32/float16/bfloat16 and int64 labels in ``[0, K)``, add each
  image's spatial mean of each unit into ``sums[labels[b]]`` (``[K, U]`` float64) and count the
  images per class in ``counts`` (``[K]`` int64). In place; call it once per batch.
* ``selectivity_index(sums, counts, eps)``: over the classes with ``counts > 0``: the class means,
  ``mu_max`` (the largest; ``pref_class`` is its class, the lowest on ties), ``mu_rest`` (the mean
  of the other classes' means, 0 when one class is present) and
  ``si = (mu_max - mu_rest) / (mu_max + mu_rest + eps)`` (0 where the denominator is 0, so an
  all-zero unit scores 0, never NaN). With no class present: si 0, pref_class -1, mu 0.

Precision: the reference and the CUDA kernel sum in float64; the CPU kernel sums runs of at most 8
inputs in float32 and the rest in float64, so |error| <= 7 * 2**-24 * sum|x| (csrc/ops/accumulate/cpu/accumulate_cpu.cpp).

If the extension is not built, both fall back to the reference with one warning per process.
``SELECTIVITY_FORCE_REFERENCE=1`` forces the reference (tests, benchmarks).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import NamedTuple

import torch

try:
    from selectivity import _C  # noqa: F401  (loading it registers torch.ops.selectivity.*)

    _EXTENSION_ERROR: BaseException | None = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    _EXTENSION_ERROR = e

_warned_missing = False

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SIResult(NamedTuple):
    si: torch.Tensor  # [U] float64
    pref_class: torch.Tensor  # [U] int64, -1 where no class is present
    mu_max: torch.Tensor  # [U] float64
    mu_rest: torch.Tensor  # [U] float64


def has_extension() -> bool:
    """True when the compiled ops are loaded (whether or not the reference is being forced)."""
    return _EXTENSION_ERROR is None


def new_state(num_classes: int, num_units: int, device: torch.device | str | None = None):
    """Zeroed ``(sums [K, U] float64, counts [K] int64)`` for ``accumulate``."""
    if num_classes < 0 or num_units < 0:
        raise ValueError(f"new_state needs num_classes >= 0 and num_units >= 0, got {num_classes}, {num_units}")
    sums = torch.zeros(num_classes, num_units, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    return sums, counts


def _use_extension() -> bool:
    global _warned_missing
    if os.environ.get("SELECTIVITY_FORCE_REFERENCE") == "1":
        return False
    if _EXTENSION_ERROR is None:
        return True
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            f"selectivity._C is not built ({_EXTENSION_ERROR}); using the pure-PyTorch reference, "
            "which is several times slower. Build the extension with `make build` "
            "(or `python setup.py build_ext --inplace`).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def accumulate(act: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the per-image spatial means of ``act`` into ``sums[labels]`` and count images in ``counts``.

    ``act`` is detached: tracking never joins the autograd graph.
    """
    if _use_extension():
        torch.ops.selectivity.accumulate(act.detach(), labels, sums, counts)
    else:
        accumulate_reference(act.detach(), labels, sums, counts)


def selectivity_index(sums: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7) -> SIResult:
    """Per-unit selectivity index from accumulated ``sums`` and ``counts`` (see the module doc)."""
    if _use_extension():
        return SIResult(*torch.ops.selectivity.selectivity_index(sums, counts, float(eps)))
    return selectivity_index_reference(sums, counts, eps)


# ----- the tiled state of all tracked layers -----

TILE = 64  # units per tile (docs/extension.md: the scatter of a step against the rescans)


def new_tiled_state(rows: int, num_classes: int, num_units: int, tile: int = TILE,
                    device: torch.device | str | None = None):
    """Zeroed ``(sums [rows, tiles, K, tile], counts [rows, K])`` float64 for ``accumulate_means``."""
    if rows < 1 or num_classes < 1 or num_units < 1 or not 1 <= tile <= 64:
        raise ValueError(f"new_tiled_state needs rows, num_classes, num_units >= 1 and 1 <= tile <= 64, "
                         f"got {rows}, {num_classes}, {num_units}, {tile}")
    tiles = -(-num_units // tile)
    sums = torch.empty(rows, tiles, num_classes, tile, dtype=torch.float64, device=device)
    _ask_for_huge_pages(sums)
    return sums.zero_(), torch.zeros(rows, num_classes, dtype=torch.float64, device=device)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _ask_for_huge_pages(t: torch.Tensor) -> None:
    """madvise(MADV_HUGEPAGE) the 2 MB pages inside a fresh CPU tensor before it is first written.

    Why: a step writes B classes' rows in every tile, scattered over the whole ~100 MB state; with 4 KB
    pages nearly every write is a TLB miss, which made the scatter several times slower
    (docs/extension.md). Linux only; elsewhere, or when the kernel refuses, nothing happens."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < 2 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    import ctypes

    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    try:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def new_index_cache(sums: torch.Tensor, groups: int | None = None, bounds: bool = True) -> torch.Tensor:
    """The cache of an empty state: ``[4 + G, tiles * T]`` = (μ_max -inf, preferred class -1, sum of the
    class means 0, a bound of the other classes' means -inf; the last G rows, read as
    ``[tiles, G, T]``, a bound per unit and group of classes -inf).
    ``groups``: G, default ceil(sqrt(K)) up to 64 (csrc/common/tile_scan.h: a rescan reads a few groups).
    ``bounds=False``: the first three rows only, for ``index_cache`` from scratch (``compute()``);
    ``accumulate_means`` cannot keep such a cache."""
    K = sums.shape[-2]
    G = groups or min(64, max(1, math.ceil(math.sqrt(K))))
    cache = sums.new_full((4 + G if bounds else 3, sums.shape[-3] * sums.shape[-1]), -float("inf"))
    cache[1] = -1
    cache[2] = 0
    return cache


def accumulate_means(means: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                     weight: float = 1.0, cache: torch.Tensor | None = None,
                     rescans: torch.Tensor | None = None) -> None:
    """One step into the tiled state (module doc). In place; ``means`` is detached."""
    if _use_extension():
        torch.ops.selectivity.accumulate_means(means.detach(), labels, float(weight), sums, counts, cache, rescans)
    else:
        accumulate_means_reference(means.detach(), labels, sums, counts, weight, cache, rescans)


def index_cache(sums: torch.Tensor, counts: torch.Tensor, groups: int | None = None,
                bounds: bool = True) -> torch.Tensor:
    """The per-unit cache of one row (``sums [tiles, K, T]``, ``counts [K]``) from scratch;
    ``bounds=False``: its first three rows only (new_index_cache), a faster read of the state."""
    cache = new_index_cache(sums, groups, bounds)
    if _use_extension():
        torch.ops.selectivity.index_cache(sums, counts, cache)
    else:
        cache.copy_(index_cache_reference(sums, counts, groups, bounds))
    return cache


def si_from_cache(cache: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7,
                  shift: torch.Tensor | None = None) -> SIResult:
    """``SIResult`` of every unit of a cache (padding included) and its row's ``counts [K]``: the same
    formulas as ``selectivity_index``, on the cache's device, with no host sync.

    ``shift`` (``[tiles * T]``, ``lowest_class_means``): subtracted from every class mean first, so
    ``mu_max`` and ``mu_rest`` are of the shifted means (``mu_rest`` stays 0 with one class present);
    both are clamped at 0, which only undoes rounding (each is >= the lowest class mean)."""
    if _use_extension():
        return SIResult(*torch.ops.selectivity.si_from_cache(cache, counts, float(eps), shift))
    return si_from_cache_reference(cache, counts, eps, shift)


def layer_si_means(cache: torch.Tensor, counts: torch.Tensor, lengths: list[int], eps: float = 1e-7,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """``[L]``: the mean SI (``si_from_cache``) of each run of ``lengths`` units from unit 0 (the
    tracked layers, in order); one op, no host sync (the tracker's per-step SI)."""
    if _use_extension():
        return torch.ops.selectivity.layer_si_means(cache, counts, float(eps), shift, list(lengths))
    return layer_si_means_reference(cache, counts, lengths, eps, shift)


def lowest_class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[tiles * T]``: every unit's lowest class mean over the present classes of one row
    (``sums [tiles, K, T]``, ``counts [K]``); 0 where no class is present. A full pass over the
    row (what ``negative="shift"`` costs ``compute()`` and ``step_si()``), no host sync."""
    present = (counts > 0).view(1, -1, 1)
    means = sums / counts.clamp(min=torch.finfo(counts.dtype).tiny).view(1, -1, 1)
    lowest = means.masked_fill(~present, float("inf")).amin(1).reshape(-1)
    return torch.where(present.any(), lowest, 0.0)


def tiled_to_dense(sums: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Units ``[start, stop)`` of one row ``sums [tiles, K, T]`` as a ``[K, stop - start]`` copy."""
    K = sums.shape[1]
    return sums.permute(1, 0, 2).reshape(K, -1)[:, start:stop].contiguous()


# ----- checks (the C++ kernels make the same checks with the same wording: csrc/common/checks.cpp, csrc/common/tiled_state.cpp) -----


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_index_args(sums: torch.Tensor, counts: torch.Tensor) -> None:
    for name, t in (("sums", sums), ("counts", counts)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if sums.dtype != torch.float64:
        raise TypeError(f"sums must be float64, got {sums.dtype}; make the state with selectivity.ops.new_state()")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts must be int64, got {counts.dtype}; make the state with selectivity.ops.new_state()")
    if sums.dim() != 2:
        raise ValueError(f"sums must be 2-D [K, U], got shape {_shape(sums)}")
    if counts.dim() != 1 or counts.shape[0] != sums.shape[0]:
        raise ValueError(f"counts must be [K] with K = {sums.shape[0]} (sums.size(0)), got shape {_shape(counts)}")
    if sums.device != counts.device:
        raise ValueError(
            f"sums and counts must be on one device, got sums on {sums.device} and counts on {counts.device}"
        )
    if not (sums.is_contiguous() and counts.is_contiguous()):
        raise ValueError("sums and counts must be contiguous; make the state with selectivity.ops.new_state()")


def _check_accumulate_args(act, labels, sums, counts) -> None:
    for name, t in (("act", act), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if act.dtype not in ACT_DTYPES:
        raise TypeError(f"act must be float32, float16 or bfloat16, got {act.dtype}; cast it with act.float()")
    if act.dim() not in (2, 4):
        raise ValueError(f"act must be [B, U, H, W] or [B, U], got shape {_shape(act)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}; use labels.long()")
    _check_index_args(sums, counts)
    if labels.dim() != 1 or labels.shape[0] != act.shape[0]:
        raise ValueError(
            f"labels must be 1-D with B = {act.shape[0]} entries (act.size(0)), got shape {_shape(labels)}"
        )
    if sums.shape[1] != act.shape[1]:
        raise ValueError(f"sums must be [K, U] with U = {act.shape[1]} (act.size(1)), got shape {_shape(sums)}")
    if not (act.device == labels.device == sums.device):
        raise ValueError(
            f"act, labels, sums and counts must be on one device, got act on {act.device}, "
            f"labels on {labels.device}, sums and counts on {sums.device}"
        )
    if act.dim() == 4 and act.shape[2] * act.shape[3] == 0:
        raise ValueError(f"act has no pixels (shape {_shape(act)}); a spatial mean needs H*W >= 1")


def _check_label_range(labels: torch.Tensor, K: int) -> None:
    bad = labels[(labels < 0) | (labels >= K)]
    if bad.numel():
        raise ValueError(
            f"labels out of range: label {int(bad[0])} is not in [0, K) with K = {K} "
            "(K = sums.size(0), the number of classes)"
        )


# ----- references: float64 PyTorch, what the kernels must match -----


def accumulate_reference(act: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
    _check_accumulate_args(act, labels, sums, counts)
    _check_label_range(labels, sums.shape[0])
    means = act.double().mean((2, 3)) if act.dim() == 4 else act.double()
    sums.index_add_(0, labels, means)
    counts.index_add_(0, labels, torch.ones_like(labels))


def selectivity_index_reference(sums: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7) -> SIResult:
    _check_index_args(sums, counts)
    U = sums.shape[1]
    present = (counts > 0).nonzero().squeeze(1)
    P = present.numel()
    if P == 0:
        zeros = sums.new_zeros(U)
        return SIResult(zeros, torch.full((U,), -1, dtype=torch.int64, device=sums.device), zeros.clone(), zeros.clone())
    means = sums[present] / counts[present].unsqueeze(1).double()  # [P, U]
    mu_max = means.max(0).values
    # lowest class index among the maxima
    rank = torch.arange(P, device=sums.device).unsqueeze(1).expand(P, U)
    first = torch.where(means == mu_max, rank, P).min(0).values.clamp(max=P - 1)  # clamp: NaN means
    pref = present[first]
    mu_rest = (means.sum(0) - mu_max) / (P - 1) if P > 1 else torch.zeros_like(mu_max)
    den = mu_max + mu_rest + eps
    si = torch.where(den != 0, (mu_max - mu_rest) / torch.where(den != 0, den, 1.0), 0.0)
    return SIResult(si, pref, mu_max, mu_rest)


def _check_tiled(means, labels, sums, counts, cache, rescans) -> None:
    fix = "; make the state with selectivity.ops.new_tiled_state()"
    if sums.dtype != torch.float64 or counts.dtype != torch.float64:
        raise TypeError("sums and counts must be float64" + fix)
    if sums.dim() != 4:
        raise ValueError(f"sums must be [R, tiles, K, T], got shape {_shape(sums)}" + fix)
    R, tiles, K, T = sums.shape
    if means.dtype != torch.float32:
        raise TypeError("means must be float32; use means.float()")
    if labels.dtype != torch.int64:
        raise TypeError("labels must be int64; use labels.long()")
    if means.dim() != 2:
        raise ValueError(f"means must be a contiguous [B, N], got shape {_shape(means)}")
    if labels.dim() != 2 or labels.shape[0] != R or labels.shape[1] != means.shape[0]:
        raise ValueError(f"labels must be [R, B] = [{R}, {means.shape[0]}] (a row per state row, a column "
                         f"per image), got shape {_shape(labels)}")
    N = means.shape[1]
    if not (tiles - 1) * T < N <= tiles * T:
        raise ValueError(f"the state holds {tiles} tiles of {T} units, which does not fit {N} units" + fix)
    if cache is not None and (cache.dim() != 2 or not 5 <= cache.shape[0] <= 68 or cache.shape[1] != tiles * T):
        raise ValueError(f"cache must be contiguous float64 [4 + G, {tiles * T}] with 1 <= G <= 64 on the state's "
                         f"device, got {_shape(cache)}; make it with selectivity.ops.new_index_cache()")


def accumulate_means_reference(means, labels, sums, counts, weight=1.0, cache=None, rescans=None) -> None:
    """``accumulate_means`` in float64 PyTorch. With a cache it recomputes the cache from scratch, i.e.
    it rescans every unit, and counts them all in ``rescans``."""
    _check_tiled(means, labels, sums, counts, cache, rescans)
    R, tiles, K, T = sums.shape
    for r in range(R):
        _check_label_range(labels[r], K)
    B, N = means.shape
    padded = torch.zeros(B, tiles * T, dtype=torch.float64, device=means.device)
    padded[:, :N] = means.double()
    per_tile = padded.view(B, tiles, T).transpose(0, 1)  # [tiles, B, T]
    for r in range(R):
        group_sum = torch.zeros(tiles, K, T, dtype=torch.float64, device=means.device)
        group_sum.index_add_(1, labels[r], per_tile)
        sums[r] += weight * group_sum  # as the kernels: the class's sum, then times the weight
        counts[r] += weight * torch.bincount(labels[r], minlength=K).double()
    if cache is not None:
        cache.copy_(index_cache_reference(sums[0], counts[0], cache.shape[0] - 4))
        if rescans is not None:
            rescans += torch.tensor([tiles * T, 1], device=rescans.device)


def index_cache_reference(sums: torch.Tensor, counts: torch.Tensor, groups: int | None = None,
                          bounds: bool = True) -> torch.Tensor:
    tiles, K, T = sums.shape
    if not bounds:
        return index_cache_reference(sums, counts, groups)[:3].clone()
    present = (counts > 0).nonzero().squeeze(1)
    out = new_index_cache(sums, groups)
    size = -(-K // (out.shape[0] - 4))  # classes per group
    if present.numel():
        means = sums.permute(1, 0, 2).reshape(K, tiles * T)[present] / counts[present, None]
        best = means.max(0).values
        rank = torch.arange(len(present), device=sums.device).unsqueeze(1).expand_as(means)
        first = torch.where(means == best, rank, len(present)).min(0).values.clamp(max=len(present) - 1)
        others = means.scatter(0, first.unsqueeze(0), -float("inf"))  # the runner-up: all but the maximum
        out[0], out[1], out[2], out[3] = best, present[first].double(), means.sum(0), others.max(0).values
        groups = out.new_full((out.shape[0] - 4, tiles * T), -float("inf"))  # [G, units]
        for g in range(groups.shape[0]):
            chosen = (present >= g * size) & (present < (g + 1) * size)
            if chosen.any():
                groups[g] = means[chosen].max(0).values
        # stored [tiles, G, T], as the kernels read it (csrc/common/tile_scan.h)
        out[4:] = groups.view(-1, tiles, T).transpose(0, 1).reshape(-1, tiles * T)
    return out


def si_from_cache_reference(cache: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7,
                            shift: torch.Tensor | None = None) -> SIResult:
    """``si_from_cache`` as Python tensor ops: the same ops in the same order as the C++ composite
    (csrc/ops/si_from_cache/), so the same numbers bit for bit."""
    present = (counts > 0).sum().to(cache.dtype)
    any_present = present > 0
    mu_max = torch.where(any_present, cache[0], 0.0)
    rest = torch.where(present > 1, (cache[2] - cache[0]) / (present - 1).clamp(min=1), 0.0)
    rest = torch.where(any_present, rest, 0.0)
    if shift is not None:
        mu_max = torch.where(any_present, mu_max - shift, 0.0).clamp_min(0.0)
        rest = torch.where(present > 1, rest - shift, 0.0).clamp_min(0.0)
    den = mu_max + rest + eps
    si = torch.where(den != 0, (mu_max - rest) / torch.where(den != 0, den, 1.0), 0.0)
    return SIResult(si, cache[1].to(torch.int64), mu_max, rest)


def layer_si_means_reference(cache, counts, lengths, eps=1e-7, shift=None) -> torch.Tensor:
    si = si_from_cache_reference(cache, counts, eps, shift).si
    return torch.stack([layer.mean() for layer in si[:sum(lengths)].split(list(lengths))])


# ----- fake (meta) implementations: shapes only, for torch.compile and opcheck -----

if _EXTENSION_ERROR is None:

    @torch.library.register_fake("selectivity::accumulate")
    def _accumulate_fake(act, labels, sums, counts):
        _check_accumulate_args(act, labels, sums, counts)

    @torch.library.register_fake("selectivity::selectivity_index")
    def _selectivity_index_fake(sums, counts, eps):
        _check_index_args(sums, counts)
        U = sums.shape[1]
        return sums.new_empty(U), sums.new_empty(U, dtype=torch.int64), sums.new_empty(U), sums.new_empty(U)

    @torch.library.register_fake("selectivity::accumulate_means")
    def _accumulate_means_fake(means, labels, weight, sums, counts, cache, rescans):
        _check_tiled(means, labels, sums, counts, cache, rescans)

    @torch.library.register_fake("selectivity::index_cache")
    def _index_cache_fake(sums, counts, cache):
        pass
