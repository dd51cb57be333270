"""`python -m ming_jax.train`: the training CLI (`ming_jax.cli.train`)."""

from ming_jax.cli import train

train.run()
