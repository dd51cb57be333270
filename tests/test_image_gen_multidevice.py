"""A converted image-generation checkpoint restored onto 8 host devices: every DiT / VAE / head parameter lands with
the sharding the rules give it, and the sharded generator produces the single-device image.

Needs 8 host devices (`tests/multidevice.py`; a whole-suite run re-runs this file in a subprocess)."""

import multidevice  # first: asks for 8 host devices before jax starts
import jax
import numpy as np
from flax import nnx

from ming_jax import sharding
from ming_jax.checkpoint import convert, restore
from ming_jax.gen import flow_match, image as image_gen
from ming_jax.parity import numerics
from test_image_gen_checkpoint import QUIET, write_image_release

multi = multidevice.multi
test_suite_in_subprocess = multidevice.suite_in_subprocess(__file__)


@multi
def test_sharded_restore_and_generate(tmp_path):
    src = str(tmp_path / "release")
    write_image_release(src)
    dst = str(tmp_path / "ckpt")
    convert.convert(src, dst, **QUIET)
    mesh = sharding.make_mesh(sharding.MeshSpec(fsdp=8))
    rules = sharding.ShardingRules.preset("fsdp")
    loaded = restore.load(dst, components=["llm", "image_gen"], mesh=mesh, rules=rules, dtype="float32")
    split = 0
    for key in ("image_head", "dit", "vae"):
        module = loaded.modules[key]
        want = sharding.param_shardings(module, mesh, rules)
        flat_want = dict(nnx.to_flat_state(want))
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            arr, sh = var.get_value(), flat_want[path]
            sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
            assert arr.sharding.is_equivalent_to(sh, arr.ndim), (key, path, arr.sharding, sh)
            split += any(a is not None for a in sh.spec)
    assert split > 0  # the fsdp rules do split the DiT / head matrices
    sharded = image_gen.from_loaded(loaded)
    single = image_gen.from_loaded(restore.load(dst, components=["llm", "image_gen"], dtype="float32"))
    inputs = image_gen.prepare_condition(single.thinker.cfg, single.head, np.array([[3, 4, 5]]))
    sched = flow_match.schedule(single.cfg.scheduler, 2, 16)
    noise = image_gen.initial_latents(jax.random.key(3), (1, single.cfg.dit.in_channels, 8, 8))

    def picture(gen):  # the float image of generate's chain (the uint8 rounding would hide or magnify differences)
        caption, negative = gen.captions(inputs)
        latents = image_gen.denoise(gen.dit, caption, noise, sched, negative=negative)
        return np.asarray(image_gen.decode_images(gen.vae, latents))

    with sharding.use_mesh(mesh, rules):
        got = picture(sharded)
        assert image_gen.generate(sharded, inputs, height=32, width=32, steps=2, seed=3).shape == (1, 32, 32, 3)
    numerics.assert_close("sharded image", got, picture(single))
