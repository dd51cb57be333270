"""Convert the Ming-flash-omni 2.0 PyTorch release into a ming_jax orbax checkpoint, or export one back.

    python tools/convert_torch.py --src RELEASE_DIR --dst CKPT_DIR [--dtype bf16|f32] [--components llm,vision,audio]
    python tools/convert_torch.py --reverse --src CKPT_DIR --dst OUT_DIR [--max_shard_size 5GB]

A shim over `ming_jax.cli.convert` (also `python -m ming_jax.convert`), runnable from a checkout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ming_jax.cli import convert  # noqa: E402

if __name__ == "__main__":
    convert.run("convert_torch")
