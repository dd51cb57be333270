"""Shared building blocks (norms, rotary, attention, GLU MLP) used by every sub-model."""
