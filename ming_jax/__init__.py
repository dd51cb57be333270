"""ming_jax: a JAX / Flax NNX implementation of Ming-flash-omni 2.0."""

__version__ = "0.1.0"
