"""separable_conv, lowrank_conv and lowrank_linear on Linear/Conv1D: shapes, costs, refusals, the SVD start."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from theseus_cli.models.cost import count_params
from theseus_cli.replacements import IOShapes, get_replacement

ANY = IOShapes((1,), (1,))  # shapes the conv checks do not read

GEOMETRIES = [
    (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10)),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 11, 9)),
    (nn.Conv2d(4, 6, 3, dilation=2, padding=2), (2, 4, 12, 12)),
    (nn.Conv2d(3, 6, 5, padding=2, padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding="valid", bias=False), (2, 3, 9, 13)),
    (nn.Conv2d(3, 6, 3, padding="same", padding_mode="circular"), (2, 3, 7, 7)),
    (nn.Conv1d(3, 5, 3, stride=2), (2, 3, 16)),
    (nn.Conv3d(2, 4, 3, padding=1), (2, 2, 5, 5, 5)),
]


def _build(name: str, old: nn.Module, x: torch.Tensor, **params):
    rep = get_replacement(name)
    p = rep.params_model.model_validate(params)
    y = old(x)
    reason = rep.check_accepts(old) or rep.check_fit(old, p, IOShapes(tuple(x.shape[1:]), tuple(y.shape[1:])))
    assert reason is None, reason
    return rep.build(old, p, IOShapes(tuple(x.shape[1:]), tuple(y.shape[1:]))), y


@pytest.mark.parametrize("name", ["separable_conv", "lowrank_conv"])
@pytest.mark.parametrize("conv, shape", GEOMETRIES)
def test_reproduces_the_convs_output_shape(name, conv, shape):
    x = torch.randn(shape)
    new, y = _build(name, conv, x)
    assert new(x).shape == y.shape
    # and at another input size: the geometry is kept, not a fixed flattened size
    bigger = torch.randn(shape[:2] + tuple(s + 3 for s in shape[2:]))
    assert new(bigger).shape == conv(bigger).shape


def test_separable_conv_parts_and_cost():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    new, _ = _build("separable_conv", conv, torch.randn(1, 16, 8, 8))
    depthwise, pointwise = new[0], new[-1]
    assert depthwise.groups == 16 and depthwise.stride == (2, 2) and depthwise.bias is None
    assert pointwise.kernel_size == (1, 1) and pointwise.bias is not None
    assert count_params(new) == 16 * 9 + 16 * 32 + 32 < count_params(conv)


def test_separable_conv_optional_norm_and_activation():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    new, _ = _build("separable_conv", conv, torch.randn(2, 4, 6, 6), norm=True, activation="relu")
    assert [type(m) for m in new] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert new[-1].bias is None  # follows the guide's conv
    plain, _ = _build("separable_conv", conv, torch.randn(2, 4, 6, 6), activation="gelu")
    assert plain[0].bias is not None  # a bias before a nonlinearity is not absorbed by the pointwise one


def test_refusals_name_the_reason():
    sep, low = get_replacement("separable_conv"), get_replacement("lowrank_conv")
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    assert "grouped convolution (groups=2)" in sep.check_fit(grouped, sep.params_model(), ANY)
    assert "grouped convolution (groups=2)" in low.check_fit(grouped, low.params_model(), ANY)
    assert "nothing to separate" in sep.check_fit(nn.Conv2d(4, 8, 1), sep.params_model(), ANY)
    too_high = low.check_fit(nn.Conv2d(2, 8, 3), low.params_model(rank=19), ANY)
    assert too_high == "rank 19 exceeds the full rank 8 of its unfolded weight (8 × 18); use rank ≤ 8 or rank_ratio"
    assert sep.check_accepts(nn.ConvTranspose2d(2, 2, 3)).endswith("not ConvTranspose2d")


def test_rank_and_rank_ratio_are_exclusive():
    with pytest.raises(ValueError, match="rank or rank_ratio, not both"):
        get_replacement("lowrank_conv").params_model(rank=4, rank_ratio=0.5)


def test_lowrank_conv_rank_ratio_and_cost():
    conv = nn.Conv2d(8, 16, 3, padding=1)  # unfolded 16 × 72: full rank 16
    new, _ = _build("lowrank_conv", conv, torch.randn(1, 8, 6, 6), rank_ratio=0.25)
    assert new[0].out_channels == 4
    assert count_params(new) == 4 * 72 + 4 * 16 + 16


@pytest.mark.parametrize("conv, shape", GEOMETRIES)
def test_lowrank_conv_svd_at_full_rank_reproduces_the_guide(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    full = min(conv.out_channels, conv.weight[0].numel())
    new, y = _build("lowrank_conv", conv, x, rank=full, init="svd")
    torch.testing.assert_close(new(x), y, atol=1e-5, rtol=1e-5)


def test_lowrank_conv_svd_below_full_rank_is_the_best_approximation():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1)
    svd, _ = _build("lowrank_conv", conv, torch.randn(1, 6, 5, 5), rank=3, init="svd")
    w = conv.weight.flatten(1)
    approx = (svd[1].weight.flatten(1) @ svd[0].weight.flatten(1))
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.matrix_norm(w - approx) ** 2, (s[3:] ** 2).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 20), lambda: Conv1D(20, 12)], ids=["Linear", "Conv1D"])
def test_lowrank_linear_on_dense_layers(make):
    torch.manual_seed(0)
    old = make()
    x = torch.randn(2, 5, 12)  # token shape: any leading dims
    new, y = _build("lowrank_linear", old, x, rank=4)
    assert new(x).shape == y.shape == (2, 5, 20)
    assert count_params(new) == 4 * (12 + 20) + 20
    exact, _ = _build("lowrank_linear", old, x, rank=12, init="svd")
    torch.testing.assert_close(exact(x), y, atol=1e-5, rtol=1e-5)


def test_lowrank_linear_refusals():
    rep = get_replacement("lowrank_linear")
    assert "exceeds the full rank 3" in rep.check_fit(nn.Linear(3, 10), rep.params_model(rank=5), ANY)
    assert "use lowrank_conv" in rep.check_fit(nn.Conv2d(2, 2, 3), rep.params_model(init="svd"), ANY)
    assert rep.check_fit(nn.Linear(3, 10), rep.params_model(rank_ratio=1.0), ANY) is None


def test_svd_start_is_skipped_on_the_meta_device():
    """The plan builds each replacement on the meta device only to count its parameters."""
    conv = nn.Conv2d(3, 6, 3)
    rep = get_replacement("lowrank_conv")
    with torch.device("meta"):
        new = rep.build(conv, rep.params_model(init="svd"), IOShapes((3, 8, 8), (6, 6, 6)))
    assert new[0].weight.is_meta


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 2, 1), (5, 2, 1), (3, 1, 2), (4, 3, 1)])
def test_factorised_same_padded_convolutions_keep_their_run_time_padding(kernel, stride, dilation):
    """timm's Conv2dSame pads in its forward, not through its attributes: the factorised pair pads the same way, at
    every input size, and the full-rank SVD start reproduces it."""
    from timm.layers import Conv2dSame

    from theseus_cli.replacements import IOShapes, get_replacement

    old = Conv2dSame(4, 6, kernel, stride=stride, dilation=dilation)
    for name, params in (("lowrank_conv", {"rank": 6, "init": "svd"}), ("separable_conv", {})):
        rep = get_replacement(name)
        new = rep.build(old, rep.params_model.model_validate(params), IOShapes((4, 9, 9), (6, 5, 5), None))
        for size in (9, 10, 17):
            x = torch.randn(2, 4, size, size)
            assert new(x).shape == old(x).shape
            if name == "lowrank_conv":
                torch.testing.assert_close(new(x), old(x), atol=1e-5, rtol=0)
