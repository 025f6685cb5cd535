"""End-to-end runs: whole training and distillation runs on a tiny synthetic set (CPU)."""
