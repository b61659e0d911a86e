"""Old location, kept so that stored files still load: `modeling_theseus.py` files exported before 0.2 import from here. Use :mod:`theseus_cli.models.hf`."""

import warnings

from theseus_cli.models.hf import HEADS, HEADS as _HEADS, build_hf, model_output, hf_directory  # noqa: F401

warnings.warn("theseus_cli.hf_models moved to theseus_cli.models.hf; this alias is kept only for files written by older versions",
              DeprecationWarning, stacklevel=2)
