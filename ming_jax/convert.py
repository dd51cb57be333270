"""`python -m ming_jax.convert`: the checkpoint converter CLI (`ming_jax.cli.convert`)."""

from ming_jax.cli import convert

if __name__ == "__main__":
    convert.run()
