"""Tests of utils/export/ (and export.py, prune.py on it)."""
