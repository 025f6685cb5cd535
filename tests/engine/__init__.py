"""Tests of utils/engine/ (the whole-run tests are in tests/e2e/)."""
