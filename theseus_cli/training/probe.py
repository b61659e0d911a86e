"""A reset head fitted as a linear probe: what makes a pretrained guide with a new head a guide.

``guide.head: reset`` gives an ImageNet-pretrained guide a fresh head for the data's classes. Alignment never
looks at the head (it matches inner activations), but three things do: the guide's metric in the report (the
retention's denominator), the teacher of the ``distill`` baseline and of ``finetune.distill``, and, for in-place
replacement, the target's starting head. A random head would make all three meaningless, so before conversion the
head alone is trained on the labelled training examples, with the rest of the guide frozen and in eval mode (its
BatchNorm statistics stay the checkpoint's). The head's inputs are computed once (one pass over the labelled
examples), so the probe costs little more than that pass. Seeded: a resumed run fits the same head again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from theseus_cli.data.core import iterate_batches
from theseus_cli.errors import ModelError

PROBE_LR = 1e-2
PROBE_BATCH = 256


def head_inputs(model: nn.Module, head: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """What ``head`` receives for every row of ``x`` (captured by a forward hook; the model in eval mode)."""
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(seen)


def fit_probe(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> dict:
    """Train ``head`` (in place) on ``features → labels``: ``steps`` Adam steps of cross-entropy on shuffled
    mini-batches (a count of steps, not epochs: a few hundred labelled examples still get a fitted head); its
    training accuracy."""
    gen = torch.Generator().manual_seed(seed)
    device = head.weight.device
    feats, labels = features.to(device), labels.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    head.train()
    done = 0
    while done < steps and feats.shape[0]:
        for idx in iterate_batches(feats.shape[0], PROBE_BATCH, gen, drop_last=False):
            if done == steps:
                break
            idx = idx.to(device)
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    with torch.no_grad():
        accuracy = float((head(feats).argmax(1) == labels).float().mean()) if feats.shape[0] else 0.0
    return {"steps": done, "examples": int(feats.shape[0]), "train_accuracy": accuracy}


def probe_reset_head(model: nn.Module, head_path: str, data, steps: int, seed: int, device: torch.device) -> dict:
    """Fit the guide's reset head at ``head_path`` on ``data``'s labelled training examples (see the module doc)."""
    if steps == 0 or data.y_train is None:
        return {"steps": 0, "examples": 0}
    head = model.get_submodule(head_path)
    idx = data.labelled
    features = head_inputs(model, head, data.x_train[idx], PROBE_BATCH, device)
    if features.dim() != 2:
        raise ModelError(f"guide.head_module: the head {head_path!r} receives {tuple(features.shape[1:])} per example, "
                         "not a feature vector; name the classifier's final nn.Linear")
    return fit_probe(head, features, data.y_train[idx].cpu(), steps, seed)
