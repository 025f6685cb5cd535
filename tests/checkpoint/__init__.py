"""Tests of utils/checkpoint/."""
