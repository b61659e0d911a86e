import math

import pytest
import torch

from theseus_cli.similarity import cka_loss, gram_is_cheaper, linear_cka


def reference_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """The paper's formula (Appendix C.1) literally, in float64: K=AAᵀ, L=BBᵀ, HKH, HLH."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    n = a.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = h @ (a @ a.T) @ h, h @ (b @ b.T) @ h
    hsic = lambda x, y: torch.trace(x @ y)  # noqa: E731
    return float(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))


def test_self_similarity_is_one():
    x = torch.randn(32, 50)
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(cka_loss(x, x)) == pytest.approx(0.0, abs=1e-5)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    torch.manual_seed(1)
    x, y = torch.randn(40, 16), torch.randn(40, 24)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    base = float(linear_cka(x, y))
    assert float(linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-5)
    assert float(linear_cka(7.5 * x, 0.01 * y)) == pytest.approx(base, abs=1e-5)


def test_not_invariant_to_arbitrary_linear_maps():
    torch.manual_seed(2)
    x = torch.randn(40, 8)
    skew = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1]))
    assert float(linear_cka(x @ skew, x)) < 0.9


@pytest.mark.parametrize("n, d1, d2", [(16, 4, 6), (16, 300, 200), (8, 1000, 3), (64, 10, 2000)])
def test_matches_float64_reference_in_both_forms(n, d1, d2):
    torch.manual_seed(n + d1 + d2)
    a = torch.randn(n, d1)
    b = a[:, : min(d1, d2)].repeat(1, d2 // min(d1, d2) + 1)[:, :d2] + 0.5 * torch.randn(n, d2)
    ref = reference_cka(a, b)
    assert float(linear_cka(a, b)) == pytest.approx(ref, abs=1e-5)
    assert float(linear_cka(a, b, dtype=torch.float64)) == pytest.approx(ref, abs=1e-12)


def test_both_forms_are_exercised():
    assert gram_is_cheaper(16, 300, 200) and not gram_is_cheaper(16, 4, 6)


def test_spatial_activations_are_flattened():
    a = torch.randn(10, 3, 4, 4)
    assert float(linear_cka(a, a.flatten(1))) == pytest.approx(1.0, abs=1e-5)


def test_degenerate_inputs_give_finite_values_and_gradients():
    a = torch.ones(8, 5, requires_grad=True)
    b = torch.randn(8, 5)
    loss = cka_loss(a, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    z = torch.zeros(8, 5, requires_grad=True)
    cka_loss(z, b).backward()
    assert torch.isfinite(z.grad).all()


def test_half_precision_inputs_are_reduced_in_float32():
    torch.manual_seed(3)
    a, b = torch.randn(64, 128), torch.randn(64, 128)
    assert float(linear_cka(a.bfloat16(), b.bfloat16())) == pytest.approx(reference_cka(a, b), abs=2e-2)
    assert linear_cka(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
