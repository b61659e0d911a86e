import pytest
import torch.nn as nn

from theseus_cli.errors import MatchError
from theseus_cli.surgery.matching import pattern_matches, resolve_matches
from theseus_cli.config.recipe import RuleConfig
from theseus_cli.models.zoo import resnet_small


def rule(match, ignore=(), with_="lowrank_linear"):
    return RuleConfig.model_validate({"match": match, "ignore": list(ignore), "with": with_})


def test_pattern_grammar():
    conv = nn.Conv2d(1, 1, 1)
    assert pattern_matches("re:layers\\..*conv1", "layers.0.0.conv1", conv)
    assert not pattern_matches("re:conv1", "layers.0.0.conv1", conv)  # fullmatch, not search
    assert pattern_matches("layers.0.0.conv1", "layers.0.0.conv1", conv)  # exact path
    assert not pattern_matches("layers.0.0", "layers.0.0.conv1", conv)  # no prefix matching
    assert pattern_matches("Conv2d", "anything", conv)  # class name
    assert not pattern_matches("Conv", "anything", conv)


def test_class_name_with_ignore_in_execution_independent_order():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    matches = resolve_matches(model, [rule("Conv2d", ignore=["re:.*downsample.*"])])
    paths = [m.path for m in matches]
    assert paths == ["conv1", "layers.0.0.conv1", "layers.0.0.conv2", "layers.1.0.conv1", "layers.1.0.conv2"]


def test_rule_matching_nothing_is_an_error_with_suggestion():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    with pytest.raises(MatchError, match=r"replace\[1\]: match 'Conv2D' matched no module \(closest: Conv2d"):
        resolve_matches(model, [rule("conv1"), rule("Conv2D")])


def test_module_claimed_twice_is_an_error():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    with pytest.raises(MatchError, match=r"module 'conv1' is claimed by replace\[0\] and replace\[1\]"):
        resolve_matches(model, [rule("Conv2d"), rule("re:conv1")])


def test_nested_claims_are_an_error():
    model = resnet_small(widths=(4, 8), blocks=(1, 1))
    with pytest.raises(MatchError, match="is inside 'layers.1.0.downsample'"):
        resolve_matches(model, [rule("layers.1.0.downsample"), rule("re:layers\\.1\\.0\\.downsample\\.0")])


def test_a_class_name_claims_its_subclasses_and_exact_does_not():
    import timm

    from theseus_cli.surgery.matching import unclaimed_instances

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    same = [p for p, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert "conv_stem" in same and len(same) == 5  # the stem and the stride-2 depthwise convolutions
    claimed = [m.path for m in resolve_matches(model, [rule("Conv2d")])]
    assert set(same) <= set(claimed) and len(claimed) == 49
    exact = [rule("exact:Conv2d")]
    claimed = [m.path for m in resolve_matches(model, exact)]
    assert not set(same) & set(claimed) and len(claimed) == 44
    left = unclaimed_instances(model, exact, claimed)
    assert [u["path"] for u in left] == same and left[0] == {"path": "conv_stem", "type": "Conv2dSame", "class": "Conv2d", "rule": 0}
    with pytest.raises(ValueError, match="'exact:' takes a class name"):
        rule("exact:conv.stem")
