"""Tests of utils/ops/."""
