"""Tests of utils/core/."""
