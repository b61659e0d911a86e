"""Old location, kept so that stored files still load: `modeling_theseus.py` files exported before 0.2 import PlanEntry and apply_entries from here. Use :mod:`theseus_cli.surgery.plan`."""

import warnings

from theseus_cli.surgery.plan import PlanEntry, apply_entries, build_plan, Plan  # noqa: F401

warnings.warn("theseus_cli.plan moved to theseus_cli.surgery.plan; this alias is kept only for files written by older versions",
              DeprecationWarning, stacklevel=2)
