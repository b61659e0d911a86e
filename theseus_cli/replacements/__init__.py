"""Replacement modules: what a guide module becomes in the target.

Importing this package registers every built-in replacement in
:data:`theseus_cli.replacements.registry.REPLACEMENTS`.
"""

from theseus_cli.replacements.registry import REPLACEMENTS, IOShapes, Replacement, get_replacement, register, start_from_weights, weights_follow
from theseus_cli.replacements import lowrank  # noqa: F401  (registers lowrank_linear)

__all__ = ["REPLACEMENTS", "IOShapes", "Replacement", "get_replacement", "register", "start_from_weights",
           "weights_follow"]
from theseus_cli.replacements import sequence  # noqa: F401,E402  (registers token_mlp, elman_rnn)
from theseus_cli.replacements import conv  # noqa: F401,E402  (registers separable_conv, lowrank_conv)
from theseus_cli.replacements import linear_attention  # noqa: F401,E402  (registers linear_attention)
from theseus_cli.replacements import identity  # noqa: F401,E402  (registers identity)
