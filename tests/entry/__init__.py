"""Tests of the entry scripts' command lines and options objects (train.py, val.py, export.py, ...)."""
