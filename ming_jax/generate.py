"""`python -m ming_jax.generate`: the generation CLI (`ming_jax.cli.generate`)."""

from ming_jax.cli import generate

if __name__ == "__main__":
    generate.run()
