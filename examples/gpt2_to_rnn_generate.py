"""Use theseus as a library on a language model: train a small GPT-2, convert its attention to Elman RNNs,
reload the target with one call and generate text with it.

About a minute on a laptop CPU at this (tiny) size on the King James Bible (Debian bible-kjv):
    python examples/gpt2_to_rnn_generate.py [OUT_DIR]
The converted model is an ordinary transformers GPT2LMHeadModel whose attention modules are RNNs, so
``generate`` works, and streams: the RNNs keep their hidden states in the model's cache, so after the prompt each
step feeds one new token (``load_target`` turns ``generation_config.use_cache`` on).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import theseus_cli
from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.pipelines.train_guide import train_guide
from theseus_cli.config.recipe import parse_recipe
from theseus_cli.data.text import load_tokenizer

RECIPE = {
    "task": "causal-lm",
    "guide": {"arch": "hf:gpt2", "kwargs": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32}},
    "data": {"source": "bible-kjv", "tokenizer": "gpt2", "sequence_length": 32, "train_limit": 160, "test_limit": 32,
             "batch_size": 16},
    "replace": [{"match": "GPT2Attention", "with": "elman_rnn", "params": {"layers": 2}, "align_up": 1}],
    "align": {"epochs": 1, "lr": 2e-3},
    "bn_recalibration": {"enabled": False},
    "finetune": {"epochs": 1, "lr": 2e-3, "warmup_epochs": 0.2},
    "seed": 0,
}


def main(out: Path, prompt: str = "And God said") -> dict:
    recipe = parse_recipe(RECIPE, "examples/gpt2_to_rnn_generate.py")
    guide = train_guide(recipe, out / "guide.safetensors", epochs=3, lr=3e-3, device="cpu")
    # no baselines here (bench/transformers_attention.py compares NoT with them): each would train the whole model
    # again, and at GPT-2's 50,257-token vocabulary that is most of the example's time on a CPU; nor latency timing
    report = run_conversion(recipe, out / "run", ConvertOptions(checkpoint=out / "guide.safetensors", device="cpu", overwrite=True,
                                                                latency=False))

    target = theseus_cli.load_target(out / "run")  # rebuilt from target.safetensors alone
    tok = load_tokenizer(target.theseus_meta.tokenizer)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = target.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(generated[0])

    m = report["metric"]
    print(f"perplexity: guide {guide['perplexity']:.1f} | NoT target {m['target']:.1f}")
    print(f"RNN target continues {prompt!r}: {text!r}")
    return {"report": report, "text": text, "prompt_ids": ids, "generated": generated, "target": target}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
