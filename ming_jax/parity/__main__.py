"""`python -m ming_jax.parity CASE_DIR`: the parity CLI (`ming_jax.cli.parity`)."""

from ming_jax.cli import parity

parity.run()
