"""theseus: convert a trained PyTorch model into another architecture (Network of Theseus)."""

__version__ = "0.1.0"


def load_target(path, device: str = "cpu"):
    """Rebuild a converted target from ``target.safetensors`` or its run directory."""
    from theseus_cli.artifacts import load_target as _load

    return _load(path, device)


__all__ = ["__version__", "load_target"]
