"""Utilities for yolo-distill: one concern per module, nothing runs at import."""
