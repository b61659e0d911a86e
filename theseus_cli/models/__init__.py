"""Models: architecture specs → modules (a registry of spec prefixes), checkpoints read without running code,
transformers models and directories, the small built-in zoo, and forward hooks."""

from theseus_cli.models.sources import MODEL_SOURCES, ModelSource, register_model_source
from theseus_cli.models.build import build_model, load_guide, read_state_dict, trusting_pickles  # noqa: E402
from theseus_cli.models import hf  # noqa: F401,E402  (registers hf:)

__all__ = ["MODEL_SOURCES", "ModelSource", "register_model_source", "build_model", "load_guide", "read_state_dict",
           "trusting_pickles"]
