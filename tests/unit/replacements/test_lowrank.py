import pytest
import torch
import torch.nn as nn

from theseus_cli.replacements import IOShapes, get_replacement
from theseus_cli.replacements.lowrank import LowRankLinear, LowRankLinearParams


def _replace(conv: nn.Module, x: torch.Tensor, rank: int = 8) -> tuple[nn.Module, torch.Tensor]:
    y = conv(x)
    rep = get_replacement("lowrank_linear")
    new = rep.build(conv, LowRankLinearParams(rank=rank), IOShapes(tuple(x.shape[1:]), tuple(y.shape[1:])))
    return new, y


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 11, 9)),
        (nn.Conv2d(4, 8, 3, dilation=2, padding=2, groups=2), (2, 4, 12, 12)),
        (nn.Conv2d(3, 6, 5, padding=2, padding_mode="circular"), (2, 3, 8, 8)),
        (nn.Conv2d(3, 8, 1, stride=2, bias=False), (2, 3, 7, 7)),
        (nn.Conv1d(3, 5, 3), (2, 3, 16)),
        (nn.ConvTranspose2d(4, 2, 3, stride=2), (2, 4, 5, 5)),
    ],
)
def test_output_shape_matches_the_conv(conv, shape):
    x = torch.randn(shape)
    new, y = _replace(conv, x)
    assert new(x).shape == y.shape
    assert isinstance(new, LowRankLinear)


def test_parameter_count_is_factorised():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    new, _ = _replace(conv, torch.randn(1, 2, 6, 6), rank=5)
    d_in, d_out = 2 * 6 * 6, 4 * 6 * 6
    assert sum(p.numel() for p in new.parameters()) == d_in * 5 + 5 * d_out + d_out


def test_can_represent_the_conv_exactly_at_full_rank():
    """A conv on a fixed-size input is a linear map: the factorisation can express it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(4, 2, 5, 5)
    new, _ = _replace(conv, x, rank=2 * 5 * 5)
    basis = torch.eye(2 * 5 * 5).view(-1, 2, 5, 5)
    with torch.no_grad():
        dense = (conv(basis) - conv.bias.view(1, -1, 1, 1)).flatten(1)  # (in, out)
        new.down.weight.copy_(torch.eye(50))
        new.up.weight.copy_(dense.T)
        new.up.bias.copy_(conv(torch.zeros(1, 2, 5, 5)).flatten())
    torch.testing.assert_close(new(x), conv(x), rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_factors():
    new, _ = _replace(nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6))
    new(torch.randn(5, 3, 6, 6)).square().mean().backward()
    assert new.down.weight.grad.abs().sum() > 0 and new.up.weight.grad.abs().sum() > 0


def test_wrong_input_size_is_a_clear_error():
    new, _ = _replace(nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6))
    with pytest.raises(RuntimeError, match=r"expects inputs of shape \(B, 3, 6, 6\)"):
        new(torch.randn(2, 3, 7, 7))


def test_rejects_modules_that_are_neither_convs_nor_linear():
    reason = get_replacement("lowrank_linear").check_accepts(nn.LayerNorm(3))
    assert reason == "lowrank_linear replaces _ConvNd, Linear, Conv1D, not LayerNorm"
