"""Thin absl mains over the library: parse flags, call one library function, show progress. Each is reachable as
`python -m ming_jax.<name>` and as a console script (pyproject.toml)."""
