"""Image generation and editing CLI.

    python -m ming_jax.imagine --checkpoint DIR --prompt "a red fox in the snow" --out fox.png
    python -m ming_jax.imagine --checkpoint DIR --prompt "make it night" --ref photo.jpg --out night.png
    python -m ming_jax.imagine --prompt "anything"      # no checkpoint: TINY components with RANDOM weights

DIR is the omni release folder with its image-generation sub-folders (mlp/, connector/, transformer/, vae/,
scheduler/) or a converted checkpoint of it (`python -m ming_jax.convert`); both load through
`ming_jax.checkpoint.load`, sharded with --mesh / --rules. The prompt is wrapped in the release's chat template; the
thinker reads it (and, when editing, the reference image through the vision tower) and the learned image queries
condition the Z-Image DiT. Sampling: the release's flow-matching Euler schedule, --steps DiT calls (the last one is
the release's no-op step), classifier-free guidance --cfg (a batch of two with the all-zero negative caption;
<= 1 turns it off), seeded latents. A progress bar reports each denoising step. The PNG is written atomically.

With a byt5/ folder (the release's ByT5 glyph branch) a prompt that quotes text to render ("... that says
\"OPEN\"") also gets the release's ByT5 rows after the condition; without one, the thinker alone conditions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from ming_jax import cli, sharding
from ming_jax.checkpoint import folders, restore
from ming_jax.checkpoint import glyph as glyph_ckpt
from ming_jax.config.image_gen import ImageGenConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen import image as image_gen
from ming_jax.gen import omni
from ming_jax.processors import image_gen as image_gen_proc
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors import tokenizer
from ming_jax.processors.image import ProcessorConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Omni release folder with its image-generation sub-folders, or "
                                  "a converted checkpoint of it.")
_PROMPT = flags.DEFINE_string("prompt", "a red fox sitting in fresh snow, golden hour", "What to draw (or, with "
                              "--ref, how to edit the reference).")
_REF = flags.DEFINE_string("ref", None, "Reference image to edit (png / jpg / ...); its aspect-ratio bucket sets the "
                           "output size.")
_STEPS = flags.DEFINE_integer("steps", 30, "Denoising steps (DiT calls).")
_CFG = flags.DEFINE_float("cfg", 2.0, "Classifier-free guidance scale; <= 1: no guidance (one DiT branch).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial latents (and of the random tiny weights).")
_SIZE = flags.DEFINE_string("size", None, "HEIGHTxWIDTH of the image, snapped to the release's aspect-ratio bucket "
                            "at --resolution (default: the square bucket; with --ref: the reference's bucket).")
_RESOLUTION = flags.DEFINE_integer("resolution", 1024, "The release's bucket table (image_gen_highres): 512 or 1024 "
                                   "(the tiny default: 32-pixel multiples of it, see the printed size).")
_OUT = flags.DEFINE_string("out", "image.png", "Output PNG path.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype (default: the "
                           "checkpoint's; float32 for the tiny default).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh to load onto and run under, e.g. 'fsdp=8' (default: one "
                            "device).")
_RULES = flags.DEFINE_enum("rules", "fsdp", list(sharding.PRESETS), "Sharding preset used with --mesh.")

TINY_SIDE = 64  # the tiny default's image side when --size is not given (its VAE has scale factor 4)


def _tiny_configs() -> tuple[OmniConfig, ImageGenConfig]:
    """The tiny omni model with the release's special-token layout (<image> = <imagePatch> + 1, </image> = + 2)."""
    llm = LLMConfig.tiny(image_patch_token=990, image_start_token=991, video_start_token=992, video_patch_token=993)
    return OmniConfig.tiny(llm=llm), ImageGenConfig.tiny()


def _mesh():
    """(mesh, rules) from --mesh / --rules, or (None, None)."""
    return cli.mesh_and_rules(_MESH.value, _RULES.value)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 1024x768") from None
    if h <= 0 or w <= 0:
        raise app.UsageError(f"--size {text!r}: both sides must be positive")
    return h, w


def _setup(with_vision: bool):
    """(omni config, image-gen config, tokenizer, processor config, make: () -> (omni model | None, generator))."""
    processor = ProcessorConfig.ming_flash_omni_2()
    if _CHECKPOINT.value:
        ckpt = _CHECKPOINT.value
        problem = folders.image_gen_problem(ckpt)
        sections = folders.image_gen_sections(ckpt)
        if sections is None:
            why = problem or "no image-generation folders (mlp/, connector/, transformer/, vae/, scheduler/)"
            raise app.UsageError(f"{ckpt}: {why}; image generation needs them")
        if not os.path.exists(os.path.join(ckpt, "tokenizer.json")):
            raise app.UsageError(f"{ckpt} has no tokenizer.json: copy the release's tokenizer.json (and "
                                 "tokenizer_config.json) into the folder")
        cfg = OmniConfig.from_official(restore.read_config(ckpt))
        ig = ImageGenConfig.from_official(sections)
        tok = tokenizer.ReleaseTokenizer(ckpt)

        def make():
            mesh, rules = _mesh()
            dtype = _DTYPE.value or restore.checkpoint_dtype(ckpt)
            comps = ["llm", "image_gen"] + (["vision"] if with_vision else [])
            print(f"loading {ckpt} ({', '.join(comps)}) ...", file=sys.stderr)
            loaded = restore.load(ckpt, components=comps, mesh=mesh, rules=rules, dtype=dtype, compute_dtype=dtype)
            glyph = None
            if glyph_ckpt.has_glyph(ckpt):  # kept in float32, as the release keeps ByT5 and its mapper
                print("loading the ByT5 glyph branch (byt5/) ...", file=sys.stderr)
                glyph = glyph_ckpt.load_glyph(ckpt)
            return (loaded.omni() if with_vision else None), image_gen.from_loaded(loaded, glyph)

        return cfg, ig, tok, processor, make
    cfg, ig = _tiny_configs()
    print("No --checkpoint given: running TINY image-generation components with RANDOM weights and a byte-level "
          "stand-in tokenizer. The picture is noise-like; it only shows the pipeline (thinker -> queries -> "
          "connector -> DiT sampler -> VAE) working end to end.", file=sys.stderr)
    runtime = Runtime(dtype=_DTYPE.value, param_dtype=_DTYPE.value) if _DTYPE.value else Runtime()
    tok = prompt_lib.StandInTokenizer(prompt_lib.tiny_special_ids(cfg.llm))

    def make():
        model = omni.create(cfg, runtime, seed=_SEED.value)
        return model, image_gen.random_generator(ig, model.llm, runtime, seed=_SEED.value)

    return cfg, ig, tok, processor, make


def _sizes(ig: ImageGenConfig, ref_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """(diffusion size, output size). A release: the aspect-ratio bucket of the reference (editing), of --size, or
    the default square; the picture is then resized (LANCZOS) to keep the asked-for aspect ratio, as the release
    does. The tiny default: --size (or TINY_SIDE) rounded down to what its small VAE takes, no resize."""
    if not _CHECKPOINT.value:
        h, w = ref_hw or (_parse_size(_SIZE.value) if _SIZE.value else (TINY_SIDE, TINY_SIDE))
        q = 2 * ig.vae.scale_factor
        hw = (max(q, h // q * q), max(q, w // q * q))
        return hw, hw
    want = ref_hw or (_parse_size(_SIZE.value) if _SIZE.value else
                      image_gen_proc.default_size(_RESOLUTION.value, None))
    try:
        return image_gen_proc.bucket_size(*want, _RESOLUTION.value)
    except image_gen_proc.ImageGenError as e:
        raise app.UsageError(f"--size / --resolution: {e}") from None


def _write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial.png")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        os.replace(tmp, path)  # atomic: a reader never sees half a file; concurrent runs never share a temp file
    except BaseException:
        os.unlink(tmp)
        raise


class _Bar:
    """tqdm over the denoising steps, fed by `image_gen.progress_listener`."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="denoising", file=sys.stderr)

    def __call__(self, step: int, total: int) -> None:
        self.bar.update(step - self.bar.n)

    def close(self):
        self.bar.close()


def main(argv):
    del argv
    if _STEPS.value < 1:
        raise app.UsageError(f"--steps {_STEPS.value}: at least one step")
    if _RULES.present and not _MESH.value:
        raise app.UsageError("--rules applies to --mesh, which is not given")
    reference = ref_hw = None
    if _REF.value:
        if _SIZE.value:
            raise app.UsageError("--size does not apply with --ref: the reference's aspect-ratio bucket is the size")
        try:
            pil = image_gen_proc.load_reference(_REF.value)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--ref {_REF.value}: {e}") from None
    cfg, ig, tok, processor, make = _setup(with_vision=_REF.value is not None)
    if _REF.value and _CHECKPOINT.value:  # the release's reference: its bucket, bilinear, [-1, 1]
        reference, ref_hw = image_gen_proc.reference_pixels([pil], resolution=_RESOLUTION.value)
    elif _REF.value:  # the tiny default: the reference resized the same way to the tiny size
        ref_hw = (TINY_SIDE, TINY_SIDE)
        small = np.asarray(pil.convert("RGB").resize((TINY_SIDE, TINY_SIDE), resample=2), np.float32) / 255.0
        reference = ((small - 0.5) * 2.0).transpose(2, 0, 1)[None]
    (height, width), out_hw = _sizes(ig, ref_hw)
    if reference is not None and reference.shape[2:] != (height, width):
        raise AssertionError(f"reference {reference.shape} does not have the diffusion size {(height, width)}")
    content = ([{"type": "image", "image": _REF.value}] if _REF.value else []) + [{"type": "text", "text": _PROMPT.value}]
    try:
        builder = prompt_lib.PromptBuilder.for_model(tok, cfg, processor)
        inputs = builder.build([{"role": "HUMAN", "content": content}])
    except prompt_lib.PromptError as e:
        print(f"imagine: {e}", file=sys.stderr)
        return 1
    model, gen = make()
    embeds = grids = None
    if _REF.value:
        media = omni.encode_media(model, inputs)
        embeds, grids = np.asarray(media.image_embeds, np.float32), inputs.image_grid_thw
    chat = prompt_lib.apply_chat_template([{"role": "HUMAN", "content": content}])
    cond = image_gen.prepare_condition(gen.thinker.cfg, gen.head, inputs.input_ids, inputs.attention_mask, embeds, grids,
                                       glyph=gen.glyph, prompt_texts=[chat])
    if cond.glyph_ids is not None:
        print(f"glyph text (ByT5): {int(cond.glyph_mask.sum())} byte tokens", file=sys.stderr)
    print(f"prompt: {inputs.input_ids.shape[1]} tokens + {ig.head.num_query_tokens} image queries; image "
          f"{height}x{width}, {_STEPS.value} steps, cfg {_CFG.value}, seed {_SEED.value}"
          f"{', editing ' + _REF.value if _REF.value else ''}", file=sys.stderr)
    bar = _Bar(_STEPS.value)
    mesh, rules = _mesh()
    t0 = time.perf_counter()
    try:
        with image_gen.progress_listener(bar), (sharding.use_mesh(mesh, rules) if mesh is not None
                                                else contextlib.nullcontext()):
            images = image_gen.generate(gen, cond, height=height, width=width, steps=_STEPS.value, guidance=_CFG.value,
                                        seed=_SEED.value, reference=reference)
    finally:
        bar.close()
    picture = images[0] if out_hw == (height, width) else image_gen_proc.resize_output(images[0], out_hw)
    _write_png(_OUT.value, picture)
    print(f"wrote {_OUT.value} ({picture.shape[0]}x{picture.shape[1]}) in {time.perf_counter() - t0:.1f} s "
          f"(including compilation)", file=sys.stderr)
    return 0


def run():
    cli.run(main, __name__)
