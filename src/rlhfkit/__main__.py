"""``python -m rlhfkit ...`` runs the CLI (what ``torchrun -m`` and ``accelerate launch -m`` start)."""

from rlhfkit.cli import main

main()
