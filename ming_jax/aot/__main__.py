"""`python -m ming_jax.aot`: the AOT memory-plan CLI (`ming_jax.cli.aot`)."""

from ming_jax.cli import aot

aot.run()
