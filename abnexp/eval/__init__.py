"""Evaluators, one per task, and ``abnexp eval`` (see run.py)."""
