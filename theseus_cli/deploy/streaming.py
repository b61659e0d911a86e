"""Streaming ONNX export of a converted decoder: a prefill graph and a decode-step graph with explicit state.

An edge runtime cannot hold a Python cache object, so the state the replaced modules keep during ``generate``
(:mod:`theseus_cli.replacements.state`) becomes graph inputs and outputs:

* ``<name>.prefill.onnx`` — ``input_ids`` (B, T), ``attention_mask`` (B, T; left padding) → ``logits`` (B, T, V)
  and every state tensor after each sequence's last real token;
* ``<name>.step.onnx`` — ``input_ids`` (B, 1), ``position_ids`` (B, 1: the number of real tokens before this
  one, as ``generate`` counts them) and the state tensors → ``logits`` (B, 1, V) and the new state tensors.

The state's names, shapes (``batch`` symbolic) and the module each belongs to are in both files'
``metadata_props["theseus_streaming"]`` (JSON), so a runtime needs no other description; the order of the graph
inputs after ``position_ids`` and of the outputs after ``logits`` is that list's order.

Only a decoder whose every sequence mixer was replaced by a module with a state (``elman_rnn``, causal
``linear_attention``) or none (``token_mlp``) streams this way; a kept attention layer would need its growing
key–value cache as a graph input. Such targets get the whole-sequence file only, and the export result says why.
Both graphs are written with the TorchScript-based exporter (``torch.export`` unrolls the RNN's time loop to the
example's length) and checked step by step against PyTorch before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from theseus_cli.replacements.linear_attention import LinearAttention
from theseus_cli.replacements.sequence import ElmanRNN, TokenMLP
from theseus_cli.replacements.state import cache_keyword, recurrent_layer_class

STREAMING_KEY = "theseus_streaming"
_STATEFUL = (ElmanRNN, LinearAttention, TokenMLP)


def streaming_modules(model: nn.Module) -> tuple[list[tuple[int, nn.Module]] | None, str | None]:
    """The replaced sequence modules by layer index, or None and the reason the model cannot stream."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        return None, "not a transformers decoder"
    layers = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
    found = {m.layer_idx: m for m in model.modules() if isinstance(m, _STATEFUL) and m.layer_idx is not None}
    missing = [i for i in range(layers or 0) if i not in found]
    if not layers or missing:
        return None, (f"layers {missing} keep their attention (a growing key-value cache has no fixed-size state); "
                      "only the whole-sequence graph is written" if missing else "the model's layer count is unknown")
    if any(isinstance(m, LinearAttention) and not m.causal for m in found.values()):
        return None, "non-causal linear attention has no state to carry"
    return sorted(found.items()), None


def _install(cache, modules, states: tuple[torch.Tensor, ...], seen: int) -> None:
    """Put ``states`` (flat, in layout order) into fresh recurrent slots of ``cache``."""
    recurrent, it = recurrent_layer_class(), iter(states)
    for idx, module in modules:
        while len(cache.layers) <= idx:
            cache.layers.append(recurrent.__bases__[1]())
        slot = recurrent()
        slot.store(tuple(next(it) for _ in range(_state_count(module))), seen)
        cache.layers[idx] = slot


def _state_count(module: nn.Module) -> int:
    return 0 if isinstance(module, TokenMLP) else 1 if isinstance(module, ElmanRNN) else 2


def _collect(cache, modules) -> list[torch.Tensor]:
    return [s for idx, _ in modules for s in cache.layers[idx].state]


class PrefillGraph(nn.Module):
    """(input_ids, attention_mask) → (logits, *state): the prompt's forward with the cache on."""

    def __init__(self, model: nn.Module, modules):
        super().__init__()
        self.model, self.modules_ = model, modules

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # The replaced modules get the (B, T) mask itself: transformers' 4-D mask would be built with the traced
        # example's length frozen in, and no kept attention needs it.
        hooks = [m.register_forward_pre_hook(lambda mod, args, kw: (args, {**kw, "attention_mask": attention_mask}),
                                             with_kwargs=True) for _, m in self.modules_]
        try:
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, **{cache_keyword(self.model): cache})
        finally:
            for hook in hooks:
                hook.remove()
        return (out.logits, *_collect(cache, self.modules_))


class StepGraph(nn.Module):
    """(input_ids, position_ids, *state) → (logits, *new state): one generation step."""

    def __init__(self, model: nn.Module, modules):
        super().__init__()
        self.model, self.modules_ = model, modules

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *states: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()
        _install(cache, self.modules_, states, seen=1)  # the count only sizes masks no replaced module reads
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                         **{cache_keyword(self.model): cache})
        return (out.logits, *_collect(cache, self.modules_))


def state_layout(modules, states: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Name, module and shape (batch first, symbolic) of every state tensor, in graph order."""
    layout, it = [], iter(states)
    for idx, module in modules:
        for j in range(_state_count(module)):
            s = next(it)
            layout.append({"name": f"state_{idx}_{j}", "layer": idx, "module": type(module).__name__,
                           "shape": ["batch", *s.shape[1:]], "dtype": str(s.dtype).removeprefix("torch.")})
    return layout


def sample_prompt(vocab: int, pads: tuple[int, ...], length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of ``length`` tokens, row ``b`` padded by ``pads[b]``."""
    ids = torch.randint(1, vocab, (len(pads), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids * mask, mask


def write_metadata(path: Path, layout: list[dict], extra: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in {STREAMING_KEY: json.dumps({"state": layout}), **extra}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def streaming_paths(out: Path) -> dict[str, Path]:
    """Where the two graphs of ``out`` (``x.onnx``) go: ``x.prefill.onnx`` and ``x.step.onnx``."""
    return {kind: out.with_name(f"{out.stem}.{kind}.onnx") for kind in ("prefill", "step")}


def _trace(graph: nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int,
           sequence_inputs: tuple[str, ...]) -> None:
    axes = {n: {0: "batch", 1: "sequence"} if n in sequence_inputs else {0: "batch"} for n in inputs + outputs}
    torch.onnx.export(graph, example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=opset)


def write_graphs(model: nn.Module, modules, folder: Path, opset: int) -> tuple[dict[str, Path], list[dict], tuple]:
    """Trace both graphs into ``folder`` (on two prompts of 6 tokens, one left-padded); returns their paths, the
    state layout and a prompt of another batch size, length and padding for the check."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids, mask = sample_prompt(vocab, (0, 2), 6)
    prefill, step = PrefillGraph(model, modules).eval(), StepGraph(model, modules).eval()
    with torch.no_grad():
        logits, *states = prefill(ids, mask)
    layout = state_layout(modules, states)
    names = [s["name"] for s in layout]
    paths = {kind: folder / f"{kind}.onnx" for kind in ("prefill", "step")}
    _trace(prefill, (ids, mask), paths["prefill"], ["input_ids", "attention_mask"], ["logits", *names], opset,
           ("input_ids", "attention_mask", "logits"))
    token, position = logits[:, -1].argmax(-1, keepdim=True), mask.sum(1, keepdim=True)
    _trace(step, (token, position, *states), paths["step"], ["input_ids", "position_ids", *names],
           ["logits", *[f"next_{n}" for n in names]], opset, ())
    return paths, layout, sample_prompt(vocab, (0, 3, 1), 9, seed=1)


def check_streaming(model: nn.Module, modules, paths: dict[str, Path], prompt: tuple, atol: float, rtol: float,
                    steps: int = 4) -> dict[str, Any]:
    """Run the prompt through the prefill graph and ``steps`` greedy steps through the step graph on ONNX Runtime,
    beside PyTorch's own streaming forward fed the same tokens; every logit and state must agree."""
    import numpy as np
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    ids, mask = prompt
    prefill, step = PrefillGraph(model, modules).eval(), StepGraph(model, modules).eval()
    worst = 0.0

    def compare(expected, got) -> None:
        nonlocal worst
        for e, g in zip(expected, got):
            e = e.detach().numpy()
            worst = max(worst, float(np.abs(e - g).max()))
            if not np.allclose(g, e, atol=atol, rtol=rtol):
                raise AssertionError(f"max |difference| {np.abs(e - g).max():.2e} (atol {atol}, rtol {rtol})")

    with torch.no_grad():
        expected = prefill(ids, mask)
        compare(expected, sessions["prefill"].run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}))
        position = mask.sum(1, keepdim=True)
        for _ in range(steps):
            token = expected[0][:, -1].argmax(-1, keepdim=True)
            feeds = [token, position, *expected[1:]]
            names = [i.name for i in sessions["step"].get_inputs()]
            got = sessions["step"].run(None, {n: t.numpy() for n, t in zip(names, feeds)})
            expected = step(*feeds)
            compare(expected, got)
            position = position + 1
    return {"passed": True, "steps": steps, "max_abs_diff": worst, "batch": int(ids.shape[0]),
            "prompt_padding": [int(p) for p in (mask == 0).sum(1)]}
