"""Write the sample training set: short ASCII text conversations (reverse, add, copy, sort, upper, count; some with
several turns or a system text) that a tiny model can overfit, in the JSONL format of `ming_jax.train.data`.

    python tools/make_sample_dataset.py --out data/sample.jsonl [--n 256] [--seed 0]

Deterministic for a given --n and --seed; the file is written atomically.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from absl import app, flags

from ming_jax.train import data

_OUT = flags.DEFINE_string("out", None, "JSONL file to write.", required=True)
_N = flags.DEFINE_integer("n", 256, "Number of conversations.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the generator.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    path = data.write_sample(_OUT.value, n=_N.value, seed=_SEED.value)
    print(f"wrote {_N.value} conversations to {path}")


if __name__ == "__main__":
    app.run(main)
