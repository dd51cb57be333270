"""Parity with the official PyTorch code: golden cases, one numerics helper with one tolerance table, and a runner
per case kind (`cases/`)."""
