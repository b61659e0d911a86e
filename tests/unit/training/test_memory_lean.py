"""What keeps a large decoder's conversion within one guide plus the trained state: bf16 frozen weights only where
they stay frozen, epoch snapshots without the frozen weights, fused AdamW, the plan-time count of what alignment
alone trains, and Llama-style attention replaced with its own head count."""

import torch
import transformers

from theseus_cli.config.recipe import parse_recipe
from theseus_cli.pipelines.checks import trained_params
from theseus_cli.replacements.linear_attention import LinearAttentionParams, resolved_heads
from theseus_cli.surgery.plan import build_plan
from theseus_cli.training.faults import restore, snapshot
from theseus_cli.training.runtime import adamw, default_dtype, frozen_weights_dtype
from theseus_cli.training.session import open_session
from tests.conftest import tiny_recipe_dict


def test_frozen_weights_are_bf16_only_where_nothing_trains_them():
    from tests.unit.training.test_block_store import _recipe as text_recipe

    assert frozen_weights_dtype(text_recipe(runtime={"precision": "bf16"}, finetune={"peft": {}})) == torch.bfloat16
    for changes in ({"runtime": {"precision": "bf16"}},  # full fine-tuning needs float32 master weights
                    {"finetune": {"peft": {}}},  # an fp32 run
                    {"runtime": {"precision": "auto"}, "finetune": {"peft": {}}}):  # the recipe's decision, not the device's
        assert frozen_weights_dtype(text_recipe(**changes)) is None
    # an image guide is fed float32 pixels outside autocast (checks, plans): it stays float32
    image = parse_recipe(tiny_recipe_dict(runtime={"precision": "bf16"}, finetune={"peft": {}}))
    assert frozen_weights_dtype(image) is None
    with default_dtype(torch.bfloat16):
        assert torch.nn.Linear(2, 2).weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_a_snapshot_holds_what_training_can_change_and_restores_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    (saved,) = snapshot([model])
    assert "0.weight" not in saved and {"0.bias", "1.running_mean", "2.weight"} <= set(saved)
    frozen, before = model[0].weight.clone(), model[2].weight.clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[1].running_mean.add_(1.0)
    restore([model], [saved])
    assert torch.equal(model[2].weight, before) and torch.equal(model[1].running_mean, torch.zeros(3))
    assert torch.equal(model[0].weight, frozen)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_multi_tensor_form():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused, plain = adamw(a, 1e-2, 0.1), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=True)
    assert fused.defaults["fused"]
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.sin(p.detach() * 3)
            q.grad = torch.sin(q.detach() * 3)
        fused.step()
        plain.step()
    for p, q in zip(a, b):  # float64: the two forms agree far below the step size
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_without_fine_tuning_or_baselines_the_check_counts_the_replacements_alone():
    recipe = parse_recipe(tiny_recipe_dict(replace=[{"match": "3", "with": "separable_conv"}], finetune={"epochs": 0}))
    session = open_session(recipe, None, "cpu")
    plan = build_plan(session.guide, recipe, session.data.x_train[:2])
    new = sum(e.target_params for e in plan.entries)
    assert trained_params(recipe, session.guide, plan) == (new, 0) and new < plan.target_params
    assert trained_params(recipe, session.guide, plan, baseline=True) == (plan.target_params, 0)


def test_llama_attention_keeps_its_head_count_from_its_config():
    config = transformers.AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=96, intermediate_size=64,
                                               num_attention_heads=6, num_key_value_heads=2, vocab_size=50)
    attention = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    assert resolved_heads(attention, LinearAttentionParams(), 96) == 6  # not 96 // 64
    assert resolved_heads(attention, LinearAttentionParams(heads=3), 96) == 3


def test_task_training_trims_the_heap_within_steps_only_for_a_large_model_on_the_cpu(monkeypatch):
    from theseus_cli.tasks import get_task
    from theseus_cli.training import memory
    from theseus_cli.training.loops import TaskJob, train_task

    small = torch.nn.Linear(4, 3)
    assert not memory.trims_each_step(small, torch.device("cpu"))  # 60 bytes of weights: nothing to gain
    assert not memory.trims_each_step(small, torch.device("meta"))  # host memory is the CPU's only

    def trained(trim_from: int):
        monkeypatch.setattr(memory, "TRIM_EACH_STEP_BYTES", trim_from)
        calls = []
        real = memory.release_freed_memory
        monkeypatch.setattr("theseus_cli.training.loops.release_freed_memory", lambda: calls.append(1) or real())
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        job = TaskJob(4, 1e-2, 0.0, 0, None, 0.0, 8, torch.Generator().manual_seed(0), torch.device("cpu"), "t")
        train_task(model, get_task("classification"), x, y, job)
        return model, len(calls)

    plain, none = trained(2**40)
    trimmed, calls = trained(0)
    assert none == 0 and calls == (2 * 4 if memory._malloc_trim() is not None else 0)  # after each forward and backward
    for a, b in zip(plain.parameters(), trimmed.parameters()):  # one process: trimming changes no number
        assert torch.equal(a, b)
