"""Release folders (safetensors), our converted orbax checkpoints (manifest + tree), the converter, the
reverse export and the loader.

    from ming_jax.checkpoint import load      # one loader for both formats, onto a mesh: see `restore.load`
"""

from ming_jax.checkpoint.restore import Loaded, load

__all__ = ["Loaded", "load"]
