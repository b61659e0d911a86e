"""Generate text from a converted decoder with ONNX Runtime and numpy only, one token per step.

    python examples/gpt2_to_rnn_generate.py runs/gpt2-rnn        # a GPT-2 whose attention became RNNs
    python examples/stream_generate_onnx.py runs/gpt2-rnn/run

``theseus export RUN`` writes, for a decoder whose every attention was replaced by a module with a state,
``target.prefill.onnx`` (prompt → logits and state) and ``target.step.onnx`` (one token + state → logits and
new state) beside ``target.onnx``. :func:`generate_onnx` below is all a device needs to stream with them: it reads
the state layout from the file's metadata and never imports torch or theseus. ``main`` checks its greedy tokens
against PyTorch's ``generate`` on the same target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def generate_onnx(prefill_path: str | Path, step_path: str | Path, ids: np.ndarray, mask: np.ndarray,
                  new_tokens: int) -> np.ndarray:
    """Greedy continuation of left-padded prompts ``ids`` (B, T) with ``mask`` (B, T; 0 at padding)."""
    import onnx
    import onnxruntime as ort

    layout = json.loads({p.key: p.value for p in onnx.load(str(step_path), load_external_data=False)
                         .metadata_props}["theseus_streaming"])["state"]
    prefill = ort.InferenceSession(str(prefill_path), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])
    logits, *state = prefill.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    position = mask.sum(1, keepdims=True).astype(np.int64)  # real tokens so far: the next token's position
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(token)
        feeds = {"input_ids": token, "position_ids": position, **{s["name"]: t for s, t in zip(layout, state)}}
        logits, *state = step.run(None, feeds)
        position = position + 1
    return np.concatenate([ids, *out], axis=1)


def main(run_dir: str | Path, new_tokens: int = 16) -> dict:
    import torch

    import theseus_cli
    from theseus_cli.data.text import load_tokenizer

    run_dir = Path(run_dir)
    result = theseus_cli.export_target(run_dir, "onnx", theseus_cli.ExportOptions(overwrite=True))
    streaming = result["streaming"]
    if not streaming["written"]:
        raise SystemExit(f"no streaming graphs: {streaming['reason']}")
    target = theseus_cli.load_target(run_dir)
    tok = load_tokenizer(target.theseus_meta.tokenizer)
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    batch = tok(["In the beginning God", "And the LORD spake unto Moses, saying"], return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    onnx_tokens = generate_onnx(streaming["prefill"], streaming["step"], ids, mask, new_tokens)
    with torch.no_grad():
        torch_tokens = target.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                       max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id).numpy()
    for row in onnx_tokens:
        print(repr(tok.decode(row[ids.shape[1]:])))
    same = bool(np.array_equal(onnx_tokens, torch_tokens))
    print(f"ONNX Runtime's greedy tokens {'equal' if same else 'DIFFER FROM'} PyTorch's generate")
    return {"onnx": onnx_tokens, "torch": torch_tokens, "same": same, "export": result}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
