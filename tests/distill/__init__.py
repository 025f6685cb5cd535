"""Tests of utils/distill/."""
