"""Pallas kernels. One folder per op; kernels never import model code."""
