"""Tests of utils/convert/."""
