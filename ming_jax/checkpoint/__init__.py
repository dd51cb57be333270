"""Release folders (safetensors), our converted orbax checkpoints (manifest + tree), the converter, the
reverse export and the loader."""
