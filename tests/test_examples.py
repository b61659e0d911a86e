import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_library_conversion_example_runs_and_reloads_exactly(tmp_path):
    spec = importlib.util.spec_from_file_location("library_conversion", EXAMPLES / "library_conversion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path)
    acc = result["report"]["metric"]
    assert result["reloaded_accuracy"] == pytest.approx(acc["target"], abs=1e-12)
    assert acc["guide"] > 0.8  # a real guide on real digits
    assert acc["target"] > 0.5  # the all-Linear target learned the task, not chance
