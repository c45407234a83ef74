"""``python -m abnexp <command> ...`` (what ``torchrun -m abnexp`` runs)."""
from abnexp.cli import main

main()
