"""The training engine: the loop (trainer), checkpoints, optimizer and schedules, logging,
processes (distributed) and what training shares with evaluation (runtime)."""
