"""``python -m theseus_cli``: the CLI, also as ``torchrun --nproc-per-node N -m theseus_cli convert ...``."""

from theseus_cli.cli.app import main

if __name__ == "__main__":
    main()
