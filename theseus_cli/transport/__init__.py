"""Task-vector transport between widths (arXiv 2602.12952): Procrustes maps from calibration activations, the
mapped deltas, and the run that writes B′."""

from theseus_cli.transport.run import TransportOptions, run_transport

__all__ = ["TransportOptions", "run_transport"]
