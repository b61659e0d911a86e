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


# ---------------------------------------------------------------- unbiased CKA


def reference_hsic_u(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2007) unbiased HSIC, written term by term in float64."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    t1 = torch.trace(k @ l)
    t2 = float(one.T @ k @ one) * float(one.T @ l @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * float(one.T @ k @ l @ one)
    return float((t1 + t2 - t3) / (n * (n - 3)))


def reference_ucka(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    k, l = a @ a.T, b @ b.T
    return reference_hsic_u(k, l) / math.sqrt(reference_hsic_u(k, k) * reference_hsic_u(l, l))


@pytest.mark.parametrize("n, d1, d2", [(8, 5, 7), (12, 300, 200), (6, 40, 3)])
def test_unbiased_cka_matches_float64_reference_in_both_forms(n, d1, d2):
    from theseus_cli.similarity import unbiased_cka

    torch.manual_seed(n * d1)
    a = torch.randn(n, d1)
    b = torch.cat([a[:, : min(d1, d2)], torch.randn(n, max(0, d2 - d1))], 1)[:, :d2] + 0.3 * torch.randn(n, d2)
    ref = reference_ucka(a, b)
    assert float(unbiased_cka(a, b, dtype=torch.float64)) == pytest.approx(ref, abs=1e-10)
    assert float(unbiased_cka(a, b)) == pytest.approx(ref, abs=1e-4)


def test_unbiased_cka_removes_the_diagonal_inflation():
    """Unrelated wide representations look similar to biased CKA on few samples, not to the unbiased one."""
    from theseus_cli.similarity import unbiased_cka

    torch.manual_seed(0)
    a, b = torch.randn(16, 4000).abs(), torch.randn(16, 4000).abs()
    assert float(linear_cka(a, b)) > 0.3
    assert abs(float(unbiased_cka(a, b))) < 0.15
    assert float(unbiased_cka(a, a)) == pytest.approx(1.0, abs=1e-5)


def test_unbiased_cka_needs_four_samples():
    from theseus_cli.similarity import unbiased_cka

    with pytest.raises(ValueError, match="at least 4 samples"):
        unbiased_cka(torch.randn(3, 5), torch.randn(3, 5))


# ---------------------------------------------------------------- D-MNN


def test_soft_mnn_limits():
    """Eq. 12: with exact top-k masks, k·ḡ_soft equals the hard mutual-kNN overlap when P and Q are uniform
    on the masks. A softmax is uniform on its mask as τ → ∞ (the paper writes τ → 0); as τ → 0 it collapses
    onto the single nearest neighbour, so k·ḡ_soft → k × (share of anchors whose 1-NN agrees)."""
    from theseus_cli.similarity.dmnn import _logits, mutual_knn, soft_mnn

    torch.manual_seed(0)
    a = torch.randn(40, 16)
    b = a + 0.8 * torch.randn(40, 16)
    k = 5
    hard = float(mutual_knn(a, b, k))
    assert 0.05 < hard < 0.95  # a non-trivial case
    gaps = [abs(k * float(soft_mnn(a, b, k, tau)) - hard) for tau in (1.0, 10.0, 100.0, 1e4)]
    assert gaps[-1] < 1e-4 and gaps == sorted(gaps, reverse=True)
    nn_agree = float((_logits(a, 1.0).argmax(1) == _logits(b, 1.0).argmax(1)).float().mean())
    assert k * float(soft_mnn(a, b, k, 1e-4)) == pytest.approx(k * nn_agree, abs=1e-4)


def test_dmnn_loss_is_zero_on_identical_neighbourhoods_and_positive_otherwise():
    from theseus_cli.similarity import dmnn_loss

    torch.manual_seed(1)
    a = torch.randn(32, 8)
    assert float(dmnn_loss(a, a, k=4, tau=0.1)) == pytest.approx(0.0, abs=1e-6)
    assert float(dmnn_loss(3 * a, a, k=4, tau=0.1)) == pytest.approx(0.0, abs=1e-6)  # row scale does not matter
    assert float(dmnn_loss(torch.randn(32, 8), a, k=4, tau=0.1)) > 0.1


def test_dmnn_loss_is_finite_with_gradients_when_neighbourhoods_disagree():
    from theseus_cli.similarity import dmnn_loss

    torch.manual_seed(2)
    t = torch.randn(16, 6, requires_grad=True)
    loss = dmnn_loss(t, torch.randn(16, 6), k=3, tau=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    c = torch.ones(16, 6, requires_grad=True)  # all rows identical: ties everywhere
    dmnn_loss(c, torch.randn(16, 6), k=3).backward()
    assert torch.isfinite(c.grad).all()


def test_dmnn_needs_k_plus_one_samples():
    from theseus_cli.similarity import dmnn_loss

    with pytest.raises(ValueError, match="k=10 needs a batch of at least 11"):
        dmnn_loss(torch.randn(8, 3), torch.randn(8, 3), k=10)


def test_all_similarities_reports_every_metric():
    from theseus_cli.similarity import all_similarities

    x = torch.randn(20, 6)
    out = all_similarities(x, x, k=5)
    assert set(out) == {"cka", "ucka", "mknn"} and all(v == pytest.approx(1.0, abs=1e-6) for v in out.values())


def test_sequence_rows_flatten_and_per_token():
    from theseus_cli.similarity import sequence_rows

    a = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    flat = sequence_rows(a, "flatten", mask)
    assert flat.shape == (2, 3, 4) and torch.all(flat[0, 2] == 0) and torch.equal(flat[1], a[1])
    rows = sequence_rows(a, "per-token", mask)
    assert rows.shape == (5, 4) and torch.equal(rows[2], a[1, 0])
    assert sequence_rows(a, "per-token").shape == (6, 4)
    assert sequence_rows(a, "per-token", max_rows=4).shape == (4, 4)
    img = torch.randn(2, 3, 5, 5)
    assert sequence_rows(img, "per-token") is img  # only (B, T, D) activations are sequences


# ---------------------------------------------------------------- nearly parallel rows, small batches, D-MNN grads


def _offset_pair(offset: float, dtype: torch.dtype):
    """Late-ReLU-like activations with a common offset in every feature: row-normalised, the rows are almost parallel."""
    g = torch.Generator().manual_seed(0)
    base = torch.relu(torch.randn(32, 64, generator=g, dtype=dtype))
    return base + offset, torch.relu(base @ torch.randn(64, 48, generator=g, dtype=dtype)) + offset


def _centred_reference_ucka(a: torch.Tensor, b: torch.Tensor) -> float:
    """``reference_ucka`` on column-centred rows (HSIC_U is shift-invariant; centring keeps float64 exact here)."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    a, b = a - a.mean(0), b - b.mean(0)
    k, l = a @ a.T, b @ b.T
    return reference_hsic_u(k, l) / math.sqrt(reference_hsic_u(k, k) * reference_hsic_u(l, l))


def test_nearly_parallel_rows_are_not_mistaken_for_constant_ones():
    """An absolute floor on the self-HSIC terms collapsed CKA towards 0 here (linear 0.011, unbiased 0.019)."""
    from theseus_cli.similarity import unbiased_cka

    a, b = _offset_pair(1e4, torch.float64)
    assert float(linear_cka(a, b, dtype=torch.float64)) == pytest.approx(reference_cka(a, b), abs=1e-6)
    a, b = _offset_pair(1e3, torch.float32)
    assert float(unbiased_cka(a, b)) == pytest.approx(_centred_reference_ucka(a, b), abs=1e-3)
    assert float(linear_cka(a, b)) == pytest.approx(reference_cka(a, b), abs=1e-4)


def test_cka_of_two_samples_is_refused_as_it_is_always_one():
    from theseus_cli.errors import RecipeError
    from theseus_cli.config.recipe import parse_recipe
    from tests.conftest import tiny_recipe_dict

    a, b = torch.randn(2, 5), torch.randn(2, 7)
    assert reference_cka(a, b) == pytest.approx(1.0)  # why it is refused: no signal to align on
    with pytest.raises(ValueError, match="at least 3 samples"):
        linear_cka(a, b)
    with pytest.raises(RecipeError, match="needs data.batch_size ≥ 3, got 2"):
        parse_recipe(tiny_recipe_dict(data={"batch_size": 2}))


def test_dmnn_loss_passes_a_float64_gradcheck_on_both_sides():
    from theseus_cli.similarity import dmnn_loss

    torch.manual_seed(0)
    t = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    assert dmnn_loss(t, g, 3, 0.5).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x, y: dmnn_loss(x, y, 3, 0.5), (t, g))
    dmnn_loss(t.float(), g.float(), 3, 0.1).backward()
    assert torch.isfinite(g.grad).all() and torch.isfinite(t.grad).all()  # the guide side too, when it requires grad
