"""`python -m ming_jax.imagine`: the image generation / editing CLI (`ming_jax.cli.imagine`)."""

from ming_jax.cli import imagine

if __name__ == "__main__":
    imagine.run()
