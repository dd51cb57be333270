"""Official-name mapping tables, one module per component, all driven by `ming_jax.weights`."""
