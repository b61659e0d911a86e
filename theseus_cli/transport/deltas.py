"""``theseus transport``: move a fine-tuning delta to a model of another width, without training.

Given base model A, its fine-tuned A′ and a base model B of a different width (same family and
depth), the task vector τ = A′ − A is carried over to B′ = B + α·T(τ) (arXiv 2602.12952). A and B
run on a small unlabelled calibration set; every module with parameters present under the same
path in both gets Procrustes maps from its input and output activations
(:mod:`theseus_cli.transport.procrustes`), and each parameter's delta is mapped with them:

* Linear ``(out, in)``: ``T_outᵀ ΔW T_in``; transformers' ``Conv1D`` ``(in, out)``: ``T_inᵀ ΔW T_out``;
  biases ``T_outᵀ Δb``. A fused attention projection (``qkv``, ``c_attn``, ``in_proj``) gets one
  output map per q/k/v block.
* Conv2d kernels (``groups == 1``): channel maps over spatially flattened activations, applied to
  every kernel tap: ``ΔK_B[:, :, i, j] = T_outᵀ ΔK_A[:, :, i, j] T_in`` (beyond the reference code).
* LayerNorm / BatchNorm / GroupNorm scale and shift: ``T_outᵀ Δγ`` with the map of the norm's outputs.
* Embedding tables ``(vocab, d)`` of equal vocabulary: ``ΔE T_out``.

Directions an output's calibration data leaves undetermined (a widening layer's outputs have low
rank) are placed by a weak prior: the input statistics of the next module of the same widths, else
the similarity of weight rows (:func:`consumer_prior`, :func:`weight_prior`).

Any other parameter — a path missing in B, a module that never ran, a grouped convolution,
model-level tensors (position embeddings, class tokens) — gets a zero delta and is listed in the
report with the reason. No gradient is ever computed. With an α grid, α is chosen on a validation
split held out from the training split (disjoint from the calibration samples); BatchNorm
statistics of B′ are then re-estimated on the calibration inputs (``transport.recalibrate_bn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.models.hooks import first_tensor
from theseus_cli.transport.procrustes import PointStats, centered_cross, match_rows, procrustes, rows

FUSED = ("qkv", "c_attn", "in_proj")  # module names whose outputs are q, k, v side by side


# ---------------------------------------------------------------- calibration


def owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own parameters directly (not through children), by path."""
    return {p: m for p, m in model.named_modules() if p and any(True for _ in m.parameters(recurse=False))}


def _first_tensor(x) -> torch.Tensor | None:
    """The tensor a module's input or output stands for (:func:`~theseus_cli.models.hooks.first_tensor`), or None."""
    try:
        return first_tensor(x)
    except TypeError:
        return None


@torch.no_grad()
def calibrate(model_a: nn.Module, model_b: nn.Module, paths: list[str], batches, run) -> dict[str, PointStats]:
    """Input/output cross statistics of every path, over ``batches`` (``run(model, x)`` calls a model)."""
    stats = {p: PointStats() for p in paths}
    for x in batches:
        acts: dict[str, dict[str, tuple]] = {"a": {}, "b": {}}
        handles = []
        for side, model in (("a", model_a), ("b", model_b)):
            for p in paths:
                def hook(mod, args, out, side=side, p=p):
                    if p not in acts[side]:  # first call (a module reused in a loop: its first use)
                        acts[side][p] = (_first_tensor(args), _first_tensor(out))
                handles.append(model.get_submodule(p).register_forward_hook(hook))
        try:
            run(model_a, x)
            run(model_b, x)
        finally:
            for h in handles:
                h.remove()
        for p in paths:
            if p not in acts["a"] or p not in acts["b"]:
                continue
            module = model_a.get_submodule(p)
            (ia, oa), (ib, ob) = acts["a"][p], acts["b"][p]
            if ia is not None and ib is not None and ia.is_floating_point():
                stats[p].inputs.add(rows(ia, module), rows(match_rows(ia, ib, module), module))
            if oa is not None and ob is not None:
                stats[p].outputs.add(rows(oa, module), rows(match_rows(oa, ob, module), module))
    return stats


# ---------------------------------------------------------------- transport of one parameter


@dataclass
class Moved:
    delta: torch.Tensor | None  # None: zero delta
    reason: str  # how it was transported, or why not


def _is_conv1d_hf(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def move(name: str, module: nn.Module, delta: torch.Tensor, target_shape: torch.Size, t_in, t_out) -> Moved:
    """The delta of parameter ``name`` of ``module`` in B's shape, or why it cannot be moved."""
    kind = name.rpartition(".")[2]
    d = delta.double()
    need_out = t_out is None
    if isinstance(module, nn.Linear) or _is_conv1d_hf(module):
        if kind == "bias":
            return Moved(t_out.T @ d, "T_outᵀ Δb") if not need_out else Moved(None, "no output map")
        if t_in is None or t_out is None:
            return Moved(None, "no input/output map (module did not run on the calibration data)")
        if _is_conv1d_hf(module):
            return Moved(t_in.T @ d @ t_out, "T_inᵀ ΔW T_out (Conv1D)")
        return Moved(t_out.T @ d @ t_in, "T_outᵀ ΔW T_in")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return Moved(None, f"grouped convolution (groups={module.groups})")
        if kind == "bias":
            return Moved(t_out.T @ d, "T_outᵀ Δb") if not need_out else Moved(None, "no output map")
        if t_in is None or t_out is None:
            return Moved(None, "no input/output map (module did not run on the calibration data)")
        if tuple(delta.shape[2:]) != tuple(target_shape[2:]):
            return Moved(None, f"kernel sizes differ ({tuple(delta.shape[2:])} vs {tuple(target_shape[2:])})")
        return Moved(torch.einsum("ab,bcij,cd->adij", t_out.T, d, t_in), "T_outᵀ ΔK T_in per tap")
    if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
        if t_out is None or d.dim() != 1:
            return Moved(None, "no output map" if t_out is None else f"{d.dim()}-D normalisation parameter")
        return Moved(t_out.T @ d, "T_outᵀ Δγ (norm outputs)")
    if isinstance(module, nn.Embedding):
        if t_out is None:
            return Moved(None, "no output map")
        if delta.shape[0] != target_shape[0]:
            return Moved(None, f"vocabularies differ ({delta.shape[0]} vs {target_shape[0]})")
        return Moved(d @ t_out, "ΔE T_out")
    return Moved(None, f"{type(module).__name__} parameters are not transported")


def consumer_prior(st: PointStats, later: list[PointStats], center: bool) -> torch.Tensor | None:
    """The input cross-covariance of the next module whose inputs have this module's output widths (e.g. the
    layer after a ReLU or BatchNorm). A layer that widens has rank-deficient outputs, which cannot place every
    unit; its consumer's inputs, after the nonlinearity, usually can."""
    if st.outputs.cross is None:
        return None
    shape = st.outputs.cross.shape
    for nxt in later:
        if nxt.inputs.cross is not None and nxt.inputs.cross.shape == shape:
            return centered_cross(nxt.inputs, center)
    return None


def weight_prior(ma: nn.Module, mb: nn.Module, t_in: torch.Tensor | None) -> torch.Tensor | None:
    """How alike the output units of A's and B's module are by their weights (A's rows seen in B's input basis):
    the tie-breaker for output directions the calibration data does not excite."""
    wa, wb = getattr(ma, "weight", None), getattr(mb, "weight", None)
    if t_in is None or not isinstance(wa, torch.Tensor) or not isinstance(wb, torch.Tensor):
        return None
    wa, wb = wa.detach().double(), wb.detach().double()
    if _is_conv1d_hf(ma):
        wa, wb = wa.T, wb.T
    if isinstance(ma, nn.Linear) or _is_conv1d_hf(ma):
        if wa.shape[1] != t_in.shape[0] or wb.shape[1] != t_in.shape[1]:
            return None
        return (wa @ t_in) @ wb.T
    if isinstance(ma, nn.Conv2d) and ma.groups == 1 and wa.shape[2:] == wb.shape[2:] and wa.shape[1] == t_in.shape[0]:
        ra = torch.einsum("oikl,ij->ojkl", wa, t_in).reshape(wa.shape[0], -1)
        return ra @ wb.reshape(wb.shape[0], -1).T
    return None


def task_vector_deltas(a: nn.Module, a_tuned: nn.Module, b: nn.Module, stats: dict[str, PointStats], center: bool,
                       whiten: float) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
    """(B-shaped deltas by parameter name, per-layer map report, parameters left at zero with reasons)."""
    a_params, t_params = dict(a.named_parameters()), dict(a_tuned.named_parameters())
    b_params = dict(b.named_parameters())
    a_mods, b_mods = owners(a), owners(b)
    maps, layers, zero = {}, [], []
    order = list(stats)
    for i, (path, st) in enumerate(stats.items()):
        blocks = 3 if path.rpartition(".")[2] in FUSED else 1
        m_in = procrustes(st.inputs, center, whiten) if st.inputs.cross is not None else None
        prior = consumer_prior(st, [stats[p] for p in order[i + 1:]], center) if blocks == 1 else None
        if prior is None:
            prior = weight_prior(a_mods[path], b_mods[path], m_in.t if m_in else None)
        m_out = procrustes(st.outputs, center, whiten, blocks, prior) if st.outputs.cross is not None else None
        maps[path] = (m_in, m_out)
        layers.append({"module": path, "type": type(a_mods[path]).__name__, "rows": (m_out or m_in).rows if (m_out or m_in) else 0,
                       "input_map": list(m_in.t.shape) if m_in else None, "input_quality": m_in.quality if m_in else None,
                       "output_map": list(m_out.t.shape) if m_out else None, "output_quality": m_out.quality if m_out else None})
    deltas = {}
    for name, pa in a_params.items():
        owner, _, _ = name.rpartition(".")
        if name not in b_params:
            zero.append({"parameter": name, "reason": "not in model B"})
            continue
        delta = (t_params[name] - pa).detach()
        if owner not in a_mods or owner not in b_mods or type(a_mods[owner]) is not type(b_mods[owner]):
            zero.append({"parameter": name, "reason": "model-level tensor" if not owner else "module types differ"})
            continue
        m_in, m_out = maps.get(owner, (None, None))
        moved = move(name, a_mods[owner], delta, b_params[name].shape, m_in.t if m_in else None, m_out.t if m_out else None)
        if moved.delta is None or tuple(moved.delta.shape) != tuple(b_params[name].shape):
            reason = moved.reason if moved.delta is None else f"mapped to {tuple(moved.delta.shape)}, B has {tuple(b_params[name].shape)}"
            zero.append({"parameter": name, "reason": reason})
            continue
        deltas[name] = moved.delta.to(b_params[name].dtype)
    if not deltas:
        raise MatchError("transport: no parameter of A could be moved to B (do the models share module paths?)")
    return deltas, layers, zero


def apply_deltas(b: nn.Module, deltas: dict[str, torch.Tensor], alpha: float) -> None:
    """B's parameters += α·delta, in place."""
    params = dict(b.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d.to(params[name].device), alpha=alpha)
