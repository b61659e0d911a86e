"""Named seed streams and the one run-state context."""

import pytest
import torch

from theseus_cli.context import changed, run_state
from theseus_cli.seeds import STREAMS, Seeds


def test_streams_are_fixed_offsets_of_the_one_seed():
    s = Seeds(5)
    assert (s.data, s.align, s.recalibrate, s.finetune, s.baseline, s.baseline_init) == (5, 6, 7, 8, 9, 12)
    assert s.target_init == 1005 and s.stage(0) == 1005 and s.stage(3) == 1008
    assert torch.equal(s.generator("align").get_state(), torch.Generator().manual_seed(6).get_state())
    assert "finetune" in STREAMS
    with pytest.raises(AttributeError, match="no seed stream 'fine_tune'"):
        s.fine_tune  # noqa: B018


def test_run_state_changes_only_inside_its_block_and_nests():
    from theseus_cli.models.build import pickles_trusted, trusting_pickles
    from theseus_cli.training.runtime import Runtime, current_runtime, using

    assert run_state().runtime is None and not pickles_trusted()
    rt = Runtime("cpu")
    with using(rt), trusting_pickles():
        assert current_runtime("cpu") is rt and pickles_trusted()
        with changed(trust_pickles=False):
            assert not pickles_trusted() and current_runtime("cpu") is rt
        assert pickles_trusted()
    assert run_state().runtime is None and not pickles_trusted()
