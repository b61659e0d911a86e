"""Fitting a checkpoint from another codebase, or for another task, to the architecture a recipe builds.

Three things users bring that a strict ``load_state_dict`` refuses:

* **keys named by another codebase** (the EfficientNet-Lite0 release names ``_blocks.0._depthwise_conv.weight``
  what timm calls ``blocks.0.0.conv_dw.weight``): ``guide.key_map`` is an ordered list of regex substitutions
  applied to every checkpoint key before loading, each rule to the result of the one before;
* **a head for another label set** (an ImageNet guide for a 10-class task): ``guide.head: reset`` drops the head's
  tensors from the checkpoint and rebuilds the head for the data's classes (see :mod:`theseus_cli.training.probe`);
* **tensors that are allowed not to fit** (an auxiliary head, a buffer an older version saved): ``guide.ignore_keys``,
  ``re:`` patterns (or exact keys) whose keys may be missing, unexpected or of another shape — a missing or
  mismatched one keeps the architecture's own (seeded) initial value.

What was done is returned as a :class:`FitReport`, which ``inspect`` and the conversion report show; when keys still
do not fit, :func:`key_differences` names the renaming they most often differ by, for the error message.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from theseus_cli.errors import ModelError
from theseus_cli.patterns import compile_regex, regex_fullmatch


@dataclass(frozen=True)
class CheckpointFit:
    """How a checkpoint is fitted (the recipe's ``guide.key_map``, ``guide.ignore_keys`` and ``guide.head``)."""

    key_map: tuple[tuple[str, str], ...] = ()  # (regex without 're:', replacement), applied in order
    ignore_keys: tuple[str, ...] = ()
    head: str = "keep"  # keep | reset
    head_module: str | None = None  # reset: the head's path (None: the last nn.Linear the model registers)
    num_classes: int | None = None  # reset: the data's classes

    @classmethod
    def of(cls, guide_config, num_classes: int | None = None) -> "CheckpointFit":
        """From a recipe's ``guide`` section (any object with those fields; plain specs fit nothing)."""
        rules = tuple((r.match[3:], r.to) for r in getattr(guide_config, "key_map", ()))
        return cls(rules, tuple(getattr(guide_config, "ignore_keys", ())), getattr(guide_config, "head", "keep"),
                   getattr(guide_config, "head_module", None), num_classes)

    @property
    def changes_anything(self) -> bool:
        return bool(self.key_map or self.ignore_keys or self.head == "reset")


@dataclass
class FitReport:
    """What fitting did: keys renamed per rule, the reset head, and the keys ignored."""

    renamed: list[dict] = field(default_factory=list)  # [{"rule": "re:… → …", "keys": n}]
    head: dict | None = None  # {"path", "classes_before", "classes", "dropped_keys"}
    ignored: dict[str, list[str]] = field(default_factory=dict)  # missing / unexpected / mismatched → keys

    def to_dict(self) -> dict:
        return {"renamed": self.renamed, "head": self.head, "ignored": self.ignored}


def rename_keys(state: dict[str, torch.Tensor], rules: tuple[tuple[str, str], ...]) -> tuple[dict, list[dict]]:
    """``state`` with every rule applied to every key, in order; and how many keys each rule changed.

    Two keys renamed to one name are an error (a rule too broad), never a silent overwrite."""
    counts = [0] * len(rules)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        new = key
        for i, (pattern, repl) in enumerate(rules):
            try:
                renamed = compile_regex(pattern).sub(repl, new)
            except Exception as exc:  # a bad group reference in the replacement (\3 of a 1-group pattern)
                raise ModelError(f"guide.key_map[{i}]: cannot substitute {repl!r} for re:{pattern} in {new!r}: {exc}") from None
            counts[i] += renamed != new
            new = renamed
        if new in out:
            raise ModelError(f"guide.key_map: checkpoint keys {origin[new]!r} and {key!r} both become {new!r}")
        out[new], origin[new] = tensor, key
    return out, [{"rule": f"re:{p} → {r}", "keys": n} for (p, r), n in zip(rules, counts)]


def key_matches(patterns: tuple[str, ...], key: str) -> bool:
    return any(regex_fullmatch(p[3:], key) is not None if p.startswith("re:") else p == key for p in patterns)


def find_head(model: nn.Module, path: str | None) -> tuple[str, nn.Linear]:
    """The classification head: ``path`` if given, else the last ``nn.Linear`` the model registers (timm's
    ``classifier``/``head.fc``, torchvision's ``fc``/``classifier.N``/``heads.head`` alike)."""
    if path is not None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ModelError(f"guide.head_module: the guide has no module {path!r}") from None
        if not isinstance(module, nn.Linear):
            raise ModelError(f"guide.head_module: {path!r} is a {type(module).__name__}; a head to reset must be an nn.Linear")
        return path, module
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("guide.head: reset found no nn.Linear to use as the head; name it with guide.head_module")
    return linears[-1]


def reset_head(model: nn.Module, fit: CheckpointFit, seed: int) -> dict:
    """Rebuild the head as a fresh ``nn.Linear`` with ``fit.num_classes`` outputs (same input width, seeded)."""
    path, old = find_head(model, fit.head_module)
    classes = fit.num_classes or old.out_features
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 7919)  # its own stream: the rest of the guide's init does not depend on the head's size
    new = nn.Linear(old.in_features, classes, bias=old.bias is not None)
    torch.random.set_rng_state(generator_state)
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
    return {"path": path, "classes_before": old.out_features, "classes": classes}


def rebuild_head(model: nn.Module, head, seed: int = 0) -> nn.Module:
    """Give a freshly built architecture the head a conversion recorded (``TargetMeta``'s ``HeadSpec``, or None:
    nothing to do), so a target or baseline built from the guide's spec has the reset head's shape."""
    if head is not None:
        reset_head(model, CheckpointFit(head_module=head.path, num_classes=head.classes), seed)
    return model


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], fit: CheckpointFit, seed: int
              ) -> tuple[dict[str, torch.Tensor], FitReport]:
    """``state`` made ready for a strict load into ``model`` (whose head this may rebuild), and what was done."""
    report = FitReport()
    state, report.renamed = rename_keys(state, fit.key_map)
    if fit.head == "reset":
        report.head = reset_head(model, fit, seed)
        prefix = report.head["path"] + "."
        dropped = sorted(k for k in state if k.startswith(prefix))
        state = {k: v for k, v in state.items() if k not in dropped}
        report.head["dropped_keys"] = dropped
        own = model.state_dict()
        state.update({k: v for k, v in own.items() if k.startswith(prefix)})
    if fit.ignore_keys:
        state = _ignore(model, state, fit.ignore_keys, report)
    return state, report


def _ignore(model: nn.Module, state: dict, patterns: tuple[str, ...], report: FitReport) -> dict:
    own = model.state_dict()
    kept = {}
    for key, tensor in state.items():
        if key not in own and key_matches(patterns, key):
            report.ignored.setdefault("unexpected", []).append(key)
        elif key in own and own[key].shape != tensor.shape and key_matches(patterns, key):
            report.ignored.setdefault("mismatched", []).append(key)
            kept[key] = own[key]
        else:
            kept[key] = tensor
    for key in own:
        if key not in kept and key_matches(patterns, key):
            report.ignored.setdefault("missing", []).append(key)
            kept[key] = own[key]
    return kept


def key_differences(missing: list[str], unexpected: list[str], limit: int = 3) -> list[str]:
    """The renamings the unfitted keys most often differ by, as ``'_blocks.' ↔ 'blocks.' (n keys)``.

    Each unexpected key is paired with the most similar missing key; the first dotted component where the two
    differ is counted. Bounded: at most 300 keys of each kind are compared."""
    pool = missing[:300]
    diffs: Counter = Counter()
    for key in unexpected[:300]:
        near = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
        if not near:
            continue
        a, b = key.split("."), near[0].split(".")
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                diffs[(x + ".", y + ".")] += 1
                break
    return [f"'{x}' ↔ '{y}' ({n} keys)" for (x, y), n in diffs.most_common(limit)]
