"""Old location, kept so that stored files still load: code written against the flat layout imports the tokenizer loader from here. Use :mod:`theseus_cli.data.text`."""

import warnings

from theseus_cli.data.text import load_tokenizer  # noqa: F401

warnings.warn("theseus_cli.text_data moved to theseus_cli.data.text; this alias is kept only for files written by older versions",
              DeprecationWarning, stacklevel=2)
