"""What a search writes into its output directory (``DIR``), by name."""

META_FILE = ".search.json"  # the study's digest: --resume and joining workers check it
RESULT_FILE = "search.json"  # written last: its presence marks a finished search
TRIALS_DIR = "trials"  # trials/<candidate>/r<rung>: one run directory per rung
BEST_DIR = "best"
PARETO_FILE = "pareto.png"
