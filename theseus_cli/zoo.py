"""``theseus_cli.zoo:<name>``: the stable spec name of the small built-in architectures (recipes, saved targets).

The code lives in :mod:`theseus_cli.models.zoo`; this name is public and stays."""

from theseus_cli.models.zoo import cnn_small, resnet_small

__all__ = ["cnn_small", "resnet_small"]
