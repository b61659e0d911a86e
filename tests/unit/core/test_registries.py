"""Every plug-in axis is a registry, and the README's tables and lists name exactly what is registered."""

import re

import pytest

from tests.conftest import REPO
from theseus_cli.config.recipe import DataConfig, SimilarityConfig
from theseus_cli.data import DATA_SOURCES
from theseus_cli.models import MODEL_SOURCES
from theseus_cli.replacements import REPLACEMENTS
from theseus_cli.similarity import SIMILARITIES, make_loss, min_batch, register_similarity

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_similarity_table_is_the_registry():
    rows = re.findall(r"^\| `(\w+)`", _section("Similarities"), flags=re.M)
    assert rows == list(SIMILARITIES)


def test_every_data_source_and_model_source_is_documented():
    assert all(f"`{name}`" in README for name in DATA_SOURCES)
    assert all(f"{prefix}:" in README for prefix in MODEL_SOURCES)
    assert all(f"`{name}`" in _section("Replacements") for name in REPLACEMENTS)


def test_recipe_option_sets_come_from_the_registries():
    with pytest.raises(ValueError, match="'cka', 'ucka', 'dmnn' or 'mse'"):
        SimilarityConfig(kind="ckaa")
    with pytest.raises(ValueError, match="'fashion-mnist'"):
        DataConfig(source="cifar")


def test_a_registered_similarity_is_usable_by_name_and_a_duplicate_is_refused():
    import torch

    @register_similarity("mse_test_only", min_batch=lambda k: 2, description="test")
    def _mse(k, tau):
        return lambda t, g: (t - g).square().mean()

    try:
        assert float(make_loss("mse_test_only")(torch.ones(2, 3), torch.zeros(2, 3))) == 1.0
        assert min_batch("mse_test_only") == 2
        with pytest.raises(ValueError, match="registered twice"):
            register_similarity("mse_test_only", min_batch=lambda k: 2, description="again")(_mse)
    finally:
        SIMILARITIES.pop("mse_test_only")
    with pytest.raises(ValueError, match="valid: cka, ucka, dmnn"):
        make_loss("nope")
