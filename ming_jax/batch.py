"""`python -m ming_jax.batch`: the batch inference CLI (`ming_jax.cli.batch`)."""

from ming_jax.cli import batch

if __name__ == "__main__":
    batch.run()
