"""What a converted model is worth where it runs: ``eval`` (metric, size, latency), ``export`` (ONNX, TorchScript,
transformers directories, each checked against PyTorch), CI gates and profiling. Reads saved targets; never
imports a pipeline."""

from theseus_cli.deploy.evaluate import evaluate_model
from theseus_cli.deploy.export import ExportOptions, export_target
from theseus_cli.deploy.gates import Gates, evaluate_gates
from theseus_cli.deploy.profile import profile_model

__all__ = ["ExportOptions", "Gates", "evaluate_gates", "evaluate_model", "export_target", "profile_model"]
