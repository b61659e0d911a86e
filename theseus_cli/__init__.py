"""theseus: convert a trained PyTorch model into another architecture (Network of Theseus)."""

__version__ = "0.1.0"


def load_target(path, device: str = "cpu", trust_code: bool = False):
    """Rebuild a converted target from ``target.safetensors`` or its run directory.

    Only architectures this installation vouches for are built from a file's metadata (torchvision:, timm:,
    hf: model types and installed packages, theseus_cli.zoo); ``trust_code=True`` also builds the code or
    directory a file names, for files whose source you trust (README, "Security")."""
    from theseus_cli.artifacts import load_target as _load

    return _load(path, device, trust_code)


__all__ = ["__version__", "load_target"]
