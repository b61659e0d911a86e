"""What ``inspect`` and the alignment plot show for models with long paths, top-level parameters and many stages."""

from __future__ import annotations

import re
import warnings

import yaml
from typer.testing import CliRunner

from theseus_cli.cli.app import app
from theseus_cli.pipelines.plots import plot_alignment

VIT = "torchvision.models.vision_transformer:VisionTransformer"
VIT_KW = {"image_size": 16, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
          "num_classes": 10}
DATA = {"source": "digits", "image_size": 16, "channels": 3, "train_limit": 64, "test_limit": 32, "batch_size": 32}


def test_a_vit_transfer_names_its_top_level_parameters_and_paths_are_folded_not_cut(tmp_path):
    recipe = {"guide": {"arch": VIT, "kwargs": VIT_KW}, "data": DATA,
              "target": {"arch": VIT, "kwargs": {**VIT_KW, "num_layers": 1},
                         "blocks": {"target": "EncoderBlock", "guide": "EncoderBlock"}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "t.yaml")])
    assert res.exit_code == 0, res.output
    inherited = res.output[res.output.index("inherited from the guide"):]
    assert "class_token" in inherited and "(, " not in inherited

    replace = {"guide": {"arch": VIT, "kwargs": VIT_KW}, "data": DATA,
               "replace": [{"match": r"re:encoder\.layers\.encoder_layer_\d+\.mlp", "with": "token_mlp"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(replace))
    res = CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0, res.output
    assert not re.search(r"\S…", res.output)  # long module paths are folded over lines, never cut short ("name…")
    path_cells = "".join(line.split("│")[1].strip() for line in res.output.splitlines() if line.startswith("│"))
    assert "encoder.layers.encoder_layer_1.ln_2" in path_cells


def test_the_alignment_plot_of_many_stages_warns_nothing(tmp_path, capfd):
    stages = [{"introduced": [f"features.stage_{i}.block_{j}.conv_pointwise_expansion" for j in range(3)],
               "losses": [1.0 / (k + 1) for k in range(5)]} for i in range(40)]
    layer_sim = {f"features.stage_{i}.block_0": {"cka": 0.9, "mknn": 0.5} for i in range(40)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_alignment(tmp_path / "a.png", stages, layer_sim, "cka", "many stages")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert "Tight layout" not in capfd.readouterr().err


def test_inspect_estimates_the_alignment_and_suggests_grouping_many_stages(tmp_path):
    recipe = {"guide": {"arch": "theseus_cli.zoo:resnet_small",
                        "kwargs": {"num_classes": 10, "in_chans": 1, "widths": [4, 4, 8], "blocks": [5, 5, 5]}},
              "data": {"source": "digits", "train_limit": 300, "batch_size": 64},
              "replace": [{"match": "Conv2d", "with": "lowrank_conv"}], "align": {"epochs": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "r.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    cost = __import__("json").loads(res.stdout)["cost"]
    assert cost["stages"] == 33 and cost["steps_per_stage"] == 2 * (300 // 64) and cost["align_steps"] == 33 * 8
    assert cost["grouped"]["2"] < cost["grouped"]["3"] < cost["stages"]
    res = CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "r.yaml")])
    assert "alignment: 264 steps (33 stages × 8 steps" in res.output and "set schedule.group_depth" in res.output
    recipe["schedule"] = {"group_depth": 2}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "g.yaml")])
    assert "set schedule.group_depth" not in res.output


def _inspect_at(tmp_path, columns: int, recipe: dict) -> tuple[str, dict]:
    """``inspect`` piped with ``$COLUMNS`` set (read when the verb runs, as in a fresh process), and its JSON."""
    import json

    (tmp_path / "w.yaml").write_text(yaml.safe_dump(recipe))
    run = lambda *extra: CliRunner().invoke(app, ["inspect", "-r", str(tmp_path / "w.yaml"), *extra],  # noqa: E731
                                            env={"COLUMNS": str(columns), "CI": "true"})
    text, data = run(), run("--json")
    assert text.exit_code == 0 and data.exit_code == 0, text.output
    return text.stdout, json.loads(data.stdout)


def test_inspect_at_80_and_100_columns_splits_no_number_or_path_and_leaves_defaults_out(tmp_path):
    recipe = {"guide": {"arch": "theseus_cli.zoo:resnet_small",
                        "kwargs": {"num_classes": 10, "in_chans": 1, "widths": [4, 8], "blocks": [1, 1]}},
              "data": {"source": "digits", "train_limit": 128, "batch_size": 32},
              "replace": [{"match": "Conv2d", "with": "lowrank_conv", "params": {"rank": 2}}]}
    for columns in (80, 100):
        out, plan = _inspect_at(tmp_path, columns, recipe)
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns, columns  # honours $COLUMNS when piped
        for row in plan["rows"]:
            target = row["target_params"] if row["becomes"] else row["params"]
            for whole in (row["path"], f"{row['params']:,}", f"{target:,}"):
                assert any(whole in line for line in lines), (columns, whole)  # each on one line, unbroken
        becomes = [line for line in lines if "lowrank_conv(" in line]
        assert becomes and all("lowrank_conv(rank=2)" in line for line in becomes)  # init, bias: defaults, left out
        assert "replace[" not in out or all("replace[0]" in line for line in lines if "replace[" in line)
