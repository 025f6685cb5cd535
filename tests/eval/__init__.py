"""Tests of utils/eval/ (and val.py, detect_dual.py on it)."""
