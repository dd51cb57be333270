"""Training: losses, the optimizer and the train step (`ming_jax.aot` compiles the same step)."""
