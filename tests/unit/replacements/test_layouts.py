"""Per-position replacements on windowed (B, H, W, C) and conv-shaped (B, C, H, W) attention, 3-D to 5-D."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.models.build import build_model
from theseus_cli.replacements import IOShapes, get_replacement
from theseus_cli.replacements.layout import PerPosition
from theseus_cli.shapes import ShapeRecord
from theseus_cli.surgery.plan import apply_entries, build_plan

SWIN = "torchvision.models.swin_transformer:SwinTransformer"
SWIN_KW = {"patch_size": [4, 4], "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": [2, 2],
           "num_classes": 10}


class ChannelLast(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        return self.proj(x)


class ChannelFirst(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv3d(c, c, 1)

    def forward(self, x):
        return self.proj(x)


def _build(name: str, old: nn.Module, shape_in, shape_out=None, **params):
    rep = get_replacement(name)
    p = rep.params_model.model_validate(params)
    shapes = IOShapes(tuple(shape_in), tuple(shape_out or shape_in), None)
    record = ShapeRecord(calls=1, order=0, input=tuple(shape_in), output=tuple(shape_out or shape_in), n_inputs=1)
    why = rep.check_call(record) or rep.check_fit(old, p, shapes)
    return (None, why) if why else (rep.build(old, p, shapes), None)


@pytest.mark.parametrize("old,shape,first,where", [(ChannelLast(6), (3, 5, 6), False, (1, 2)),
                                                    (ChannelFirst(6), (6, 2, 3, 4), True, (1, 2, 3))])
def test_token_mlp_acts_at_every_position_alone_in_either_layout(old, shape, first, where):
    new, why = _build("token_mlp", old, shape)
    assert why is None and isinstance(new, PerPosition) and new.channels == ("first" if first else "last")
    x = torch.randn(2, *shape)
    y = new(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[(0, slice(None), *where) if first else (0, *where, slice(None))] += 1.0
    changed = (new(x2) - y).abs().amax(dim=1 if first else -1) > 0  # per position: did its output move?
    assert changed.sum() == 1 and changed[(0, *where)]  # only the perturbed position


def test_the_channel_axis_is_refused_where_ambiguous_and_taken_when_named():
    _, why = _build("token_mlp", nn.Identity(), (4, 4, 4))
    assert "cannot tell which axis of its input (4, 4, 4) holds the channels" in why and "params.channels" in why
    new, why = _build("token_mlp", nn.Identity(), (4, 4, 4), channels="first")
    assert why is None and new.channels == "first"
    _, why = _build("token_mlp", ChannelLast(6), (3, 5, 6), (3, 4, 6))
    assert "positions change ((3, 5) → (3, 4))" in why


def test_linear_attention_on_positions_is_non_causal_and_equals_the_flattened_sequence():
    _, why = _build("linear_attention", ChannelLast(8), (3, 4, 8), causal=True)
    assert "no causal order; set params.causal: false" in why
    new, why = _build("linear_attention", ChannelLast(8), (3, 4, 8), causal=False, heads=2)
    assert why is None
    x = torch.randn(2, 3, 4, 8)
    reference = new.inner(x.reshape(2, 12, 8)).reshape(2, 3, 4, 8)  # positions as tokens, row-major
    torch.testing.assert_close(new(x), reference)


@pytest.mark.parametrize("arch,kwargs,cls,size,layout", [
    (SWIN, SWIN_KW, "ShiftedWindowAttention", 16, "last"),
    ("timm:efficientvit_b0", {"num_classes": 10}, "LiteMLA", 32, "first"),
])
def test_swin_and_efficientvit_attention_convert(arch, kwargs, cls, size, layout):
    recipe = parse_recipe({"guide": {"arch": arch, "kwargs": kwargs}, "data": {"source": "digits"},
                           "replace": [{"match": cls, "with": "linear_attention", "params": {"causal": False}}]})
    guide = build_model(arch, kwargs, 0).eval()
    x = torch.randn(2, 3, size, size)
    plan = build_plan(guide, recipe, x)
    assert plan.entries and all(len(e.input_shape) == 3 for e in plan.entries)
    new = apply_entries(guide, plan.entries)
    assert all(m.channels == layout for m in new) and guide(x).shape == (2, 10)
