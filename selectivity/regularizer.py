"""The class-selectivity regularizer (Leavitt & Morcos 2021; paper 1's critical-period windows).

    loss = CE − α · SI_reg,     SI_reg = mean over layers of (mean over units of the minibatch SI)

α < 0 pushes selectivity down, α > 0 up. The minibatch SI is differentiable and computed from
class **means** (paper 1's code uses class sums, which biases μ_max toward the most frequent class
in the batch):

- a unit's activation for an image is the spatial mean of its channel (the units are the residual
  block outputs after their final ReLU, seen through ``units.UnitHooks`` in its means mode: the
  blocks' fused epilogue computes them, ``epilogue.add_relu_means``);
- class sums via a one-hot matmul, ``S = Yᵀ A`` ([K, U]), counts ``n = Yᵀ 1``; class means over
  the classes **present** in the batch (absent classes are excluded everywhere);
- μ_max = the largest class mean, μ_-max = the mean of the other present classes' means
  (0 when one class is present), SI = (μ_max − μ_-max)/(μ_max + μ_-max + ε), ε = ``tracker.EPS``
  (0 where the denominator is 0, as in ``ops.selectivity_index``);
- computed in float32 (float64 inputs stay float64) with autocast off, whatever the layout.

α comes from epoch windows in the config (``selectivity_reg``)::

    selectivity_reg: [{alpha: -1.0, start: 0, end: 5}, {alpha: 0.0, start: 5}]

``start`` inclusive, ``end`` exclusive (absent = forever), fractional epochs allowed; outside every
window α = 0; overlapping windows are a ConfigError. The window is chosen by the epoch being
trained, ``trainer.epoch + trainer.batch_in_epoch / trainer.steps_per_epoch``, which the checkpoint
restores, so resuming never shifts a window (paper 1's code indexed α relative to the resumed
epoch). A step with α = 0 does nothing at all: the hooks are off and no term is added.

Under DDP the class sums and counts are summed over all ranks (see ``global_sums``): the term is
the SI of the global batch, the same value on every rank, and equal — value and gradient — to a
single process's term over the concatenated batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selectivity.errors import ConfigError
from selectivity.reduce import is_distributed
from selectivity.tracker import EPS
from selectivity.units import HooksOwner, UnitHooks, check_negative, check_responses, unit_means

WINDOW_KEYS = ("alpha", "start", "end")


# ----- α windows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    alpha: float
    start: float = 0.0
    end: float = math.inf  # exclusive

    def contains(self, epoch: float) -> bool:
        return self.start <= epoch < self.end


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config key 'selectivity_reg': {what} must be a finite number, got "
                          f"{value!r}")
    return float(value)


def parse_windows(spec) -> list[Window]:
    """``selectivity_reg`` (a list of {alpha, start, end}) → windows sorted by start.

    Raises ConfigError (one line) on a malformed entry or on overlapping windows.
    """
    if spec is None:
        return []
    if isinstance(spec, dict):  # one window written without the list brackets
        spec = [spec]
    if not isinstance(spec, list):
        raise ConfigError(f"config key 'selectivity_reg' must be a list of windows like "
                          f"[{{alpha: -1.0, start: 0, end: 5}}], got {spec!r}")
    windows = []
    for i, w in enumerate(spec):
        if not isinstance(w, dict):
            raise ConfigError(f"config key 'selectivity_reg': window {i} must be a mapping like "
                              f"{{alpha: -1.0, start: 0, end: 5}}, got {w!r}")
        unknown = sorted(set(w) - set(WINDOW_KEYS))
        if unknown:
            raise ConfigError(f"config key 'selectivity_reg': window {i} has unknown key "
                              f"{unknown[0]!r}; the keys are alpha, start, end")
        if "alpha" not in w:
            raise ConfigError(f"config key 'selectivity_reg': window {i} needs an alpha, e.g. "
                              f"{{alpha: -1.0, start: 0}}")
        alpha = _number(w["alpha"], f"window {i}'s alpha")
        start = _number(w.get("start", 0), f"window {i}'s start")
        end = math.inf if w.get("end") is None else _number(w["end"], f"window {i}'s end")
        if start < 0 or end <= start:
            raise ConfigError(f"config key 'selectivity_reg': window {i} needs 0 <= start < end, "
                              f"got start {start:g}, end {end:g}")
        windows.append(Window(alpha, start, end))
    windows.sort(key=lambda w: w.start)
    for a, b in zip(windows, windows[1:]):
        if b.start < a.end:
            raise ConfigError(f"config key 'selectivity_reg': windows [{a.start:g}, {a.end:g}) and "
                              f"[{b.start:g}, {b.end:g}) overlap; end one before the next starts")
    return windows


def alpha_at(windows: list[Window], epoch: float) -> float:
    """α for the (fractional) epoch being trained: the window holding it, else 0."""
    for w in windows:
        if w.contains(epoch):
            return w.alpha
    return 0.0


# ----- the differentiable minibatch SI ----------------------------------------------------------


def class_sums(means: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """(sums [K, U] = Yᵀ A, counts [K]) by a one-hot matmul; differentiable in ``means``."""
    onehot = F.one_hot(labels, num_classes).to(means.dtype)  # [B, K]
    return onehot.t() @ means, onehot.sum(0)


def mu_parts(sums: torch.Tensor, counts: torch.Tensor,
             shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_max [U], μ_-max [U]) over the present classes; differentiable.

    Shapes stay static (no boolean indexing): absent classes are masked out of the max and the sum.
    ``shift`` (``negative="shift"``): each unit's lowest present class mean is subtracted from all
    its present class means first (the gradient also flows through that minimum).
    """
    present = counts > 0
    n_present = present.sum()
    means = sums / counts.clamp(min=1).unsqueeze(1)  # absent classes: sums 0 → mean 0
    masked = means.masked_fill(~present.unsqueeze(1), -math.inf)
    mu_max = masked.max(0).values
    mu_max = torch.where(n_present > 0, mu_max, torch.zeros_like(mu_max))
    rest_sum = (means * present.unsqueeze(1)).sum(0) - mu_max
    mu_rest = rest_sum / (n_present - 1).clamp(min=1)  # 0 when one class is present
    if shift:
        lowest = means.masked_fill(~present.unsqueeze(1), math.inf).min(0).values
        lowest = torch.where(n_present > 0, lowest, torch.zeros_like(lowest))
        mu_max = (mu_max - lowest).clamp_min(0)  # the clamps only undo rounding
        mu_rest = torch.where(n_present > 1, mu_rest - lowest, torch.zeros_like(mu_rest)).clamp_min(0)
    return mu_max, mu_rest


def si_from_sums(sums: torch.Tensor, counts: torch.Tensor, eps: float = EPS,
                 shift: bool = False) -> torch.Tensor:
    """Per-unit SI [U] from class sums and counts over the present classes; differentiable."""
    mu_max, mu_rest = mu_parts(sums, counts, shift)
    den = mu_max + mu_rest + eps
    ok = den != 0
    return torch.where(ok, (mu_max - mu_rest) / torch.where(ok, den, torch.ones_like(den)),
                       torch.zeros_like(den))


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient.

    Every rank computes the same loss term from the summed tensor; the gradient that reaches rank
    r's input is the sum over ranks of ∂term/∂input_r = world × ∂term/∂input_r, and DDP's
    averaging of parameter gradients divides by the world size again: the update is exactly that of
    one process with the concatenated batch (tests/test_regularizer.py checks it with gloo).
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def global_sums(states: list[tuple[torch.Tensor, torch.Tensor]], group=None):
    """Sum every layer's (sums, counts) over the DDP ranks in one differentiable collective.

    Why global class means rather than per-rank ones: the regularizer is defined on "the
    minibatch", and under DDP the minibatch is the global batch. Per-rank class means would make the term — its value,
    its noise floor (the minibatch SI of a unit with no class preference grows as the batch
    shrinks) and its gradient — depend on how many processes share the batch, and would leave each
    rank with ~B/K images per class. Summed sums and counts make a run on W processes regularize
    exactly what one process with W× the batch would. The cost is one all_reduce of
    K × (total units) + K floats per regularized step: 10 × 336 for ResNet-20 on 10 classes
    (negligible); 1000 × 15,104 (60 MB fp32) for ResNet-50 on ImageNet, of the order of its
    gradient all_reduce (an all_gather of the [B, U] per-image means would be cheaper when
    B × world < K). Counts are reduced too, so uneven per-rank batches are handled exactly.
    Identity in a single process.
    """
    if not is_distributed(group):
        return states
    flat = torch.cat([t for s, c in states for t in (s.reshape(-1), c.to(s.dtype))])
    flat = _AllReduceSum.apply(flat, group)
    out, offset = [], 0
    for s, c in states:
        n, k = s.numel(), c.numel()
        out.append((flat[offset:offset + n].view(s.shape), flat[offset + n:offset + n + k]))
        offset += n + k
    return out


def selectivity_reg(acts: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                    eps: float = EPS, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(SI_reg, per-layer mean SI [L]) of one minibatch; differentiable in ``acts``.

    ``acts``: one activation per layer ([B, U, H, W] or [B, U]); per layer the mean SI over its
    units, then the mean over layers, each layer weighted equally. Autocast is switched off and
    the arithmetic is float32 (float64 inputs stay float64). Under DDP the class statistics are
    summed over ranks first (``global_sums``).
    """
    device_type = labels.device.type
    with torch.autocast(device_type, enabled=False):
        states = [class_sums(unit_means(a), labels, num_classes) for a in acts]
        return reduce_states(states, eps, group)


def reduce_states(states, eps: float = EPS, group=None,
                  shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer class (sums, counts) → (SI_reg, per-layer mean SI), summed over ranks first."""
    states = global_sums(states, group)
    per_layer = torch.stack([si_from_sums(s, c, eps, shift).mean() for s, c in states])
    return per_layer.mean(), per_layer


# ----- the library face: a term for the user's own loss ---------------------------------------


class SelectivityRegularizer(HooksOwner):
    """The minibatch ``SI_reg`` of ``units`` of ``model``, for a loss of the user's own::

        reg = SelectivityRegularizer(model, num_classes=10)
        logits = model(images)                     # the hooks keep each layer's [B, U] means
        loss = F.cross_entropy(logits, labels) - alpha * reg.term(labels)

    ``term(labels)`` reduces the layers of the forward pass that just ran (differentiable; under
    DDP the class statistics are summed over ranks, see ``global_sums``); ``last_layers`` holds
    its per-layer values. Set ``enabled = False`` (or α = 0 in the trainer) and the hooks do
    nothing at all.
    """

    def __init__(self, model, num_classes: int, units="blocks", eps: float = EPS, group=None,
                 negative: str = "error"):
        self.num_classes, self.eps, self.group = num_classes, eps, group
        self.negative = check_negative(negative)  # the tracker's rule (units.NEGATIVE)
        self._responses_checked = False
        self._acts: list[torch.Tensor] = []
        self.last_layers: torch.Tensor | None = None
        # keep_acts: term() keeps the layers' means in last_acts (term_diagnostics reads them)
        self.keep_acts, self.last_acts = False, []
        # The per-image unit means, differentiable; residual blocks compute them in their fused
        # epilogue (units.UnitHooks, means mode), other layers in a hook.
        self.hooks = UnitHooks(model, units, means_fn=self._on_means, on_forward=self._clear,
                               rectify=self.negative == "relu")

    def _switched(self, enabled: bool) -> None:
        if not enabled:
            self._acts = []

    def _clear(self) -> None:  # a new forward pass: only its layers enter the next term()
        self._acts = []

    def _on_means(self, name, means):
        if not self._responses_checked:
            check_responses(name, means, self.negative)
        self._acts.append(means)

    def term(self, labels: torch.Tensor) -> torch.Tensor:
        """SI_reg of the last forward pass (mean over layers of the mean minibatch SI)."""
        if not self._acts:
            raise RuntimeError("term(): no regularized layer ran since the last term(); run the "
                               "model's forward first (with the regularizer enabled)")
        acts, self._acts = self._acts, []
        self._responses_checked = True
        with torch.autocast(labels.device.type, enabled=False):
            states = [class_sums(a, labels, self.num_classes) for a in acts]
            si_reg, self.last_layers = reduce_states(states, self.eps, self.group,
                                                     self.negative == "shift")
        if self.keep_acts:
            self.last_acts = acts
        return si_reg


# A unit is near-silent in a minibatch when μ_max + μ_-max is below this: SI's gradient through
# its class means scales as 1/(μ_max + μ_-max + ε), so such units dominate the term's gradient.
NEAR_SILENT = 1e-3


def term_diagnostics(si_reg: torch.Tensor, acts: list[torch.Tensor], labels: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖∂SI_reg/∂A‖, the fraction of near-silent units) of one minibatch, on the device.

    A: the per-image unit means of every regularized layer (what the term differentiates); the
    gradient stops there, so the parameters' gradients are untouched. The fraction is over every
    unit of every layer, from the batch's own class means (single process: under DDP the local
    batch's).
    """
    grads = torch.autograd.grad(si_reg, acts, retain_graph=True, allow_unused=True)
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads if g is not None))
    silent, units = 0, 0
    with torch.no_grad():
        for a in acts:
            mu_max, mu_rest = mu_parts(*class_sums(a.detach().float(), labels, num_classes))
            silent = silent + ((mu_max + mu_rest) < NEAR_SILENT).sum()
            units += mu_max.numel()
    return norm, silent / max(units, 1)


def regularizer_windows(cfg, alpha: float | None = None) -> list[Window]:
    """The α windows of ``cfg.selectivity_reg`` (validated: ConfigError); ``alpha`` given: a
    constant α from epoch 0 on instead (benchmarks)."""
    return [Window(float(alpha))] if alpha is not None else parse_windows(cfg.selectivity_reg)
