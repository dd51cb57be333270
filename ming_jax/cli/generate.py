"""Generation CLI: text, or text with images / audio / video (the omni model).

    python -m ming_jax.generate --checkpoint DIR --prompt "Hello" [--prompt "Another"] --max_new_tokens 64
    python -m ming_jax.generate --checkpoint DIR --image a.jpg --audio b.wav --video c.mp4 --prompt "What is this?"
    python -m ming_jax.generate --checkpoint DIR --asr --audio b.wav [--asr_topic cooking --hotword Umsh]
    python -m ming_jax.generate                     # no checkpoint: the tiny preset with RANDOM weights
    python -m ming_jax.generate --checkpoint DIR --prompt "Hello" --speak --speak_out answer.wav   # + the talker

    python -m ming_jax.generate --checkpoint CKPT --mesh expert=8 --rules ep_fsdp --prompt_ids 1,2,3

DIR is an official release folder (config.json, safetensors shards, tokenizer.json, preprocessor_config.json) or a
converted checkpoint (`python -m ming_jax.convert`); both load through `ming_jax.checkpoint.load`. With --mesh the
parameters are placed on that device mesh (sharding rules: --rules) and generation runs under it. A folder without
tokenizer.json (a converted checkpoint, the golden cases) decodes with the byte stand-in tokenizer: give the prompt
as token ids (--prompt_ids).
Text only: several --prompt flags (or the conversations of --conversation FILE.json) run as one padded batch,
each wrapped in the release's chat template (--raw: the text as it is). With any --image / --audio / --video
(each repeatable) or --asr, the whole omni model runs on one chat-formatted prompt: the media first, in flag order
by kind, then the text. All logic lives in `ming_jax.gen.text`, `ming_jax.models.omni` and `ming_jax.processors.prompt`;
this file only parses flags and prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
from absl import app, flags
from flax import nnx

from ming_jax import cli, quant, sharding
from ming_jax.checkpoint import restore
from ming_jax.config.llm import PRESETS
from ming_jax.config.runtime import Runtime
from ming_jax.config.omni import OmniConfig
from ming_jax.gen import omni
from ming_jax.gen import text as generation
from ming_jax.gen import tts
from ming_jax.gen import voice as voice_lib
from ming_jax.models import inputs as multimodal
from ming_jax.models import llm as model_lib
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors import tokenizer
from ming_jax.processors.image import ProcessorConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Release folder (config.json + safetensors) or converted "
                                  "checkpoint (ming_jax.json + params/).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh to load onto and run under, e.g. 'expert=8' or "
                            "'fsdp=2,expert=4' (default: one device).")
_RULES = flags.DEFINE_enum("rules", "ep_fsdp", list(sharding.PRESETS), "Sharding preset used with --mesh.")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Prompt as comma-separated token ids (e.g. 1,2,3); "
                                        "repeat for a batch. Replaces --prompt (text path only).")
_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "ming-flash-omni-2.0"],
                            "Model preset used when no --checkpoint is given (weights are random).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["The quick brown fox"], "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling / random-weights seed.")
_PADDING = flags.DEFINE_enum("padding_side", "left", ["left", "right"], "How the prompt batch is padded.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype (default: the "
                           "checkpoint's: a release's torch_dtype, a converted checkpoint's stored dtype; float32 "
                           "for the random tiny presets).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file for the omni model; repeatable.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "Audio file for the omni model; repeatable.")
_VIDEO = flags.DEFINE_multi_string("video", [], "Video file (or folder of frames) for the omni model; repeatable.")
_SYSTEM = flags.DEFINE_string("system", None, "Replaces the default persona of the system turn.")
_RAW = flags.DEFINE_bool("raw", False, "Text prompts: feed the text as it is, without the release's chat template.")
_CONVERSATION = flags.DEFINE_string("conversation", None, "Text: a JSON file holding one conversation (a list of "
                                    "{role, content} messages, roles HUMAN / ASSISTANT or user / assistant / "
                                    "system) or a list of conversations (a batch); the model answers the last "
                                    "human turn of each.")
_ASR = flags.DEFINE_bool("asr", False, "Transcribe the --audio clip(s) with the release's ASR instruction.")
_ASR_TOPIC = flags.DEFINE_string("asr_topic", None, "Contextual ASR: what the audio is about.")
_HOTWORD = flags.DEFINE_multi_string("hotword", [], "Contextual ASR: a word or phrase likely to occur; repeatable.")
_SPEAK = flags.DEFINE_bool("speak", False, "Speak the answer(s) with the talker of the same checkpoint (its talker/ "
                            "folder; the tiny random talker without --checkpoint) into --speak_out.")
_SPEAK_OUT = flags.DEFINE_string("speak_out", "answer.wav", "WAV of the spoken answer (several answers: "
                                 "answer_0.wav, ...).")
_SPEAK_VOICE = flags.DEFINE_string("speak_voice", tts.DEFAULT_VOICE, "Voice of the spoken answer: a name of the "
                                   "talker folder's voice_name.json when it has it ('' or a missing name: no voice).")
_QUANTIZE = flags.DEFINE_string("quantize", None, "Load the LLM's projections and expert stacks as int8 / fp8 "
                                 "weights (fp8:128, int8:128: sub-channel scales), quantized at load (`ming_jax.quant`)"
                                 "; a checkpoint converted with --dtype int8|fp8 is quantized already.")
_ANSWER_PREFIX = flags.DEFINE_string("answer_prefix", "", "Text the answer starts with (e.g. 'English\\t' for ASR in "
                                     "a known language).")
_STREAM = flags.DEFINE_bool("stream", False, "Print the answer as it is generated (one prompt; "
                            "ming_jax.gen.stream).")


class _Progress:
    def __init__(self, total: int):
        self.total, self.t0 = total, time.perf_counter()

    def __call__(self, step, running):
        step, running = int(step), int(running)
        rate = step / max(time.perf_counter() - self.t0, 1e-9)
        sys.stderr.write(f"\rdecoding {step}/{self.total} tokens, {running} row(s) running, {rate:.1f} steps/s ")
        sys.stderr.flush()


def _omni_setup():
    """(config, tokenizer, processor config, a function making the model) for --checkpoint or the tiny preset.
    The model is made last, after the prompt is built, so that bad media fail before any loading."""
    processor = ProcessorConfig.ming_flash_omni_2()
    if _CHECKPOINT.value:
        ckpt = _CHECKPOINT.value
        cfg = OmniConfig.from_official(restore.read_config(ckpt))
        if not os.path.exists(os.path.join(ckpt, "tokenizer.json")):
            raise app.UsageError(f"{ckpt} has no tokenizer.json: the omni prompt (chat template, media placeholders) "
                                 "needs the release's tokenizer; copy tokenizer.json (and tokenizer_config.json) into "
                                 "the folder")
        tok = tokenizer.ReleaseTokenizer(ckpt)
        pre = os.path.join(ckpt, "preprocessor_config.json")
        if os.path.exists(pre):
            with open(pre) as f:
                processor = ProcessorConfig.from_official(json.load(f))
        # the understanding parts only (LLM + the towers config.json has): image generation and the talker are
        # loaded by their own jobs (imagine, --speak), not held for the whole chat
        understanding = [c for c in ("llm", "vision", "audio") if getattr(cfg, c, None) is not None]
        return cfg, tok, processor, lambda: _load(ckpt, components=understanding).omni()
    if _PRESET.value != "tiny":
        raise app.UsageError(f"preset {_PRESET.value} needs --checkpoint: random weights of that size are "
                             "neither useful nor likely to fit in memory")
    cfg = OmniConfig.tiny()
    runtime = Runtime(dtype=_DTYPE.value, param_dtype=_DTYPE.value) if _DTYPE.value else Runtime()
    print("No --checkpoint given: running the TINY OMNI preset with RANDOM weights and a byte-level stand-in "
          "tokenizer. The output is meaningless text; it only shows the image / audio / video pipeline working "
          "end to end.", file=sys.stderr)
    tok = prompt_lib.StandInTokenizer(prompt_lib.tiny_special_ids(cfg.llm))
    return cfg, tok, processor, lambda: omni.create(cfg, runtime, seed=_SEED.value)


def _omni_conversation() -> list[dict]:
    """One human turn: images, videos, then audio and the text (the ASR instruction before its audio)."""
    content = ([{"type": "image", "image": p} for p in _IMAGE.value]
               + [{"type": "video", "video": p} for p in _VIDEO.value])
    audio = [{"type": "audio", "audio": p} for p in _AUDIO.value]
    if _ASR.value:
        content += [{"type": "text", "text": prompt_lib.asr_prompt(_ASR_TOPIC.value, _HOTWORD.value)}] + audio
    else:
        content += audio + [{"type": "text", "text": _PROMPT.value[0]}]
    return [{"role": "HUMAN", "content": content}]


def _omni_main() -> int:
    """Images / audio / video given: the omni model on one chat-formatted prompt."""
    if len(_PROMPT.value) > 1:
        raise app.UsageError("with --image / --audio / --video give one --prompt (the media belong to one prompt)")
    if _PROMPT_IDS.value:
        raise app.UsageError("--prompt_ids is for text-only generation (no --image / --audio / --video / --asr)")
    if _batch_rows(1) > 1:
        raise app.UsageError(f"--mesh {_MESH.value} splits the batch {_batch_rows(1)} ways; the omni prompt is one "
                             "row: use a mesh whose batch axes (data, fsdp, expert under most presets) are 1")
    if _ASR.value and not _AUDIO.value:
        raise app.UsageError("--asr needs --audio")
    cfg, tok, processor, make_model = _omni_setup()
    try:
        builder = prompt_lib.PromptBuilder.for_model(tok, cfg, processor)
        inputs = builder.build(_omni_conversation(), system=_SYSTEM.value,
                               assistant_prefix=_ANSWER_PREFIX.value.replace("\\t", "\t"),
                               max_new_tokens=_MAX_NEW.value)
    except prompt_lib.PromptError as e:
        print(f"generate: {e}", file=sys.stderr)
        return 1
    n_img = 0 if inputs.image_grid_thw is None else len(inputs.image_grid_thw)
    n_frames = 0 if inputs.video_grid_thw is None else int(inputs.video_grid_thw[:, 0].sum())
    n_audio = 0 if inputs.audio_feats_lengths is None else inputs.audio_feats_lengths.shape[1]
    print(f"prompt: {inputs.input_ids.shape[1]} tokens ({n_img} image(s), {n_frames} video temporal patch(es), "
          f"{n_audio} audio clip(s))", file=sys.stderr)
    if _CHECKPOINT.value:
        print(f"loading {_CHECKPOINT.value} ...", file=sys.stderr)
    model = make_model()
    print(f"omni model: LLM {cfg.llm.num_layers} layers / {cfg.llm.num_experts} experts, vision "
          f"{'none' if cfg.vision is None else f'{cfg.vision.depth} blocks'}, audio "
          f"{'none' if cfg.audio is None else f'{cfg.audio.encoder.n_layer} blocks'}; "
          f"{model_lib.param_count(model) / 1e6:.1f}M parameters", file=sys.stderr)
    sampling = generation.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                         top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=cfg.llm.eos_ids)
    if _STREAM.value:
        return _stream(model, inputs, sampling, tok)
    t0 = time.perf_counter()
    with _mesh_context():
        out = generation.as_numpy(omni.generate(model, inputs, sampling, seed=_SEED.value,
                                                progress=_Progress(_MAX_NEW.value)))
    sys.stderr.write(f"\ndone in {time.perf_counter() - t0:.1f} s (including compilation)\n")
    n = int(out.lengths[0])
    print(f"--- media: {len(_IMAGE.value)} image(s), {len(_VIDEO.value)} video(s), {len(_AUDIO.value)} audio clip(s)")
    print(f"+++ {n} tokens: {tok.decode(out.tokens[0][:n])!r}")
    print(f"    ids: {out.tokens[0][:n].tolist()}")
    return _speak([tok.decode(out.tokens[0][:n])]) if _SPEAK.value else 0


def _speak(answers: list[str]) -> int:
    """--speak: the answers through the talker (gen.tts), one WAV each."""
    texts = [a for a in answers if a.strip()]
    if not texts:
        print("--speak: the answer is empty; nothing to speak", file=sys.stderr)
        return 1
    try:
        if _CHECKPOINT.value:
            model = tts.load_model(_CHECKPOINT.value, dtype=_DTYPE.value)
        else:
            print("--speak: the TINY talker with RANDOM weights (no --checkpoint): the audio is noise",
                  file=sys.stderr)
            model = tts.tiny_model(_SEED.value, _DTYPE.value)
        known = model.folder is not None and _SPEAK_VOICE.value in voice_lib.voice_names(model.folder)
        voice, notes = tts.make_voice(model, name=_SPEAK_VOICE.value if known else None,
                                      key=jax.random.key(_SEED.value + 1))
        for note in notes:
            print(f"--speak: {note}", file=sys.stderr)
        tts.speak(model, texts, _SPEAK_OUT.value, voice=voice, key=jax.random.key(_SEED.value))
    except (ValueError, OSError) as e:  # TTSError, VoiceError, prompt / audio / checkpoint errors
        print(f"--speak: {e}", file=sys.stderr)
        return 1
    return 0


def _mesh():
    """(mesh, rules) from --mesh / --rules, or (None, None)."""
    return cli.mesh_and_rules(_MESH.value, _RULES.value)


def _mesh_context():
    mesh, rules = _mesh()
    return contextlib.nullcontext() if mesh is None else sharding.use_mesh(mesh, rules)


def _batch_rows(n: int) -> int:
    """`n` rounded up to a multiple of the mesh size the batch is split over (decode steps have one token per row,
    and expert parallelism needs the tokens to split evenly)."""
    mesh, rules = _mesh()
    if mesh is None:
        return n
    ways = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
    return -(-n // ways) * ways


def _param_dtypes(model) -> str:
    """The dtypes the parameters are held in, most common first (router biases are always float32)."""
    counts: dict[str, int] = {}
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        counts[str(leaf.dtype)] = counts.get(str(leaf.dtype), 0) + leaf.size
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _load(ckpt: str, **kw) -> restore.Loaded:
    mesh, rules = _mesh()
    where = f" onto mesh {dict(mesh.shape)} ({_RULES.value})" if mesh is not None else ""
    print(f"loading {ckpt}{where} ...", file=sys.stderr)
    dtype = _DTYPE.value or restore.checkpoint_dtype(ckpt)  # parameters and compute: the checkpoint's by default
    return restore.load(ckpt, mesh=mesh, rules=rules, dtype=dtype, compute_dtype=dtype, quantize=_QUANTIZE.value,
                        **kw)


_ROLES = {"HUMAN": "HUMAN", "ASSISTANT": "ASSISTANT", "user": "HUMAN", "assistant": "ASSISTANT"}


def _conversations(path: str) -> list[tuple[list[dict], str | None]]:
    """(messages with the release's roles, system text or None) per conversation of a JSON file."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--conversation {path}: not valid JSON ({e})") from None
    convs = data if data and isinstance(data, list) and isinstance(data[0], list) else [data]
    out = []
    for c, conv in enumerate(convs):
        if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"--conversation {path}: conversation {c} must be a list of {{role, content}} objects")
        system, messages = None, []
        for i, m in enumerate(conv):
            role = m.get("role")
            if role == "system":
                system = m.get("content")
                continue
            if role not in _ROLES:
                raise ValueError(f"--conversation {path}: conversation {c}, message {i}: role {role!r} (expected "
                                 f"{', '.join(_ROLES)} or system)")
            content = m.get("content", "")
            if not isinstance(content, str):
                kinds = {item.get("type") for item in content if isinstance(item, dict)}
                if kinds - {"text"}:
                    raise ValueError(f"--conversation {path}: conversation {c}, message {i} holds "
                                     f"{sorted(kinds - {'text'})} content: text-only generation takes text items "
                                     "(give media with --image / --audio / --video)")
            messages.append({"role": _ROLES[role], "content": content})
        out.append((messages, system))
    return out


def _text_prompts() -> tuple[list[str], list[str]]:
    """(prompt texts, labels): --conversation, else each --prompt as one human turn; the release's chat template
    unless --raw."""
    if _CONVERSATION.value:
        if _RAW.value:
            raise app.UsageError("--raw applies to --prompt, not to --conversation")
        convs = _conversations(_CONVERSATION.value)
        texts = [prompt_lib.apply_chat_template(m, system=_SYSTEM.value if s is None else s) for m, s in convs]
        return texts, [f"conversation {i} ({len(m)} turns)" for i, (m, _) in enumerate(convs)]
    if _RAW.value:
        return list(_PROMPT.value), [repr(p) for p in _PROMPT.value]
    texts = [prompt_lib.apply_chat_template([{"role": "HUMAN", "content": p}], system=_SYSTEM.value)
             for p in _PROMPT.value]
    return texts, [repr(p) for p in _PROMPT.value]


def _prompt_ids() -> list[list[int]]:
    try:
        rows = [[int(t) for t in text.replace(" ", "").split(",") if t] for text in _PROMPT_IDS.value]
    except ValueError:
        raise app.UsageError(f"--prompt_ids {_PROMPT_IDS.value}: expected comma-separated integers") from None
    if not all(rows):
        raise app.UsageError("--prompt_ids: an empty prompt")
    return rows


def _check_flags() -> None:
    """Flags that would otherwise be ignored silently."""
    media = _IMAGE.value or _AUDIO.value or _VIDEO.value or _ASR.value
    if _RULES.present and not _MESH.value:
        raise app.UsageError("--rules applies to --mesh, which is not given")
    if media and (_RAW.value or _CONVERSATION.value):
        raise app.UsageError("--raw / --conversation are for text-only generation; with --image / --audio / --video "
                             "/ --asr the prompt is always the release's chat template of one turn")
    if _CONVERSATION.value and (_PROMPT.present or _PROMPT_IDS.value):
        raise app.UsageError("give the prompt as --conversation or as --prompt / --prompt_ids, not both")


def main(argv):
    del argv
    _check_flags()
    if _IMAGE.value or _AUDIO.value or _VIDEO.value or _ASR.value:
        return _omni_main()
    texts = labels = ids_given = None
    if _PROMPT_IDS.value:
        ids_given = _prompt_ids()  # bad prompts fail before any loading
    else:
        try:
            texts, labels = _text_prompts()
        except (prompt_lib.PromptError, OSError, ValueError) as e:
            print(f"generate: {e}", file=sys.stderr)
            return 1
    if _CHECKPOINT.value:
        model = _load(_CHECKPOINT.value, components=["llm"]).llm
        if os.path.exists(os.path.join(_CHECKPOINT.value, "tokenizer.json")):
            tok = tokenizer.ReleaseTokenizer(_CHECKPOINT.value)
        else:
            print(f"{_CHECKPOINT.value} has no tokenizer.json: text is shown with the byte-level stand-in "
                  "tokenizer (give the prompt as --prompt_ids)", file=sys.stderr)
            tok = tokenizer.ByteTokenizer(model.cfg.vocab_size)
    else:
        if _PRESET.value != "tiny":
            raise app.UsageError(f"preset {_PRESET.value} needs --checkpoint: random weights of that size are "
                                 "neither useful nor likely to fit in memory")
        cfg = PRESETS["tiny"]()
        print("No --checkpoint given: running the TINY preset with RANDOM weights. The output is meaningless text; "
              "it only shows the pipeline working end to end.", file=sys.stderr)
        runtime = Runtime(dtype=_DTYPE.value, param_dtype=_DTYPE.value) if _DTYPE.value else None
        model = model_lib.create(cfg, runtime, seed=_SEED.value)
        if _QUANTIZE.value:
            quant.quantize_model(model, _QUANTIZE.value)
        tok = tokenizer.ByteTokenizer(cfg.vocab_size)
    cfg = model.cfg
    print(f"model: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
          f"{model_lib.param_count(model) / 1e6:.1f}M parameters ({_param_dtypes(model)}), compute dtype "
          f"{model.runtime.dtype}", file=sys.stderr)

    if _PROMPT_IDS.value:
        prompts, labels = ids_given, [f"ids {t}" for t in _PROMPT_IDS.value]
    else:
        prompts = [tok.encode(t) for t in texts]
        how = "raw text" if _RAW.value else "the release's chat template"
        print(f"{len(prompts)} prompt(s) with {how}: {', '.join(str(len(p)) for p in prompts)} tokens",
              file=sys.stderr)
    rows = _batch_rows(len(prompts))
    if rows > len(prompts):
        print(f"batch padded from {len(prompts)} to {rows} rows (repeats of the last prompt, not shown): the mesh "
              f"splits the batch {rows} ways", file=sys.stderr)
    ids, mask = generation.pad_prompts(prompts + [prompts[-1]] * (rows - len(prompts)), side=_PADDING.value,
                                       pad_id=cfg.pad_token_id or 0)
    prep = multimodal.prepare(cfg, ids, mask)
    sampling = generation.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                         top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=cfg.eos_ids)
    if _STREAM.value:
        return _stream(model, prep, sampling, tok)
    t0 = time.perf_counter()
    with _mesh_context():
        out = generation.generate(model, prep, sampling, seed=_SEED.value, progress=_Progress(_MAX_NEW.value))
        out = generation.as_numpy(out)
    sys.stderr.write(f"\ndone in {time.perf_counter() - t0:.1f} s (including compilation)\n")
    for label, toks, n in zip(labels, out.tokens, out.lengths):
        print(f"--- prompt: {label}")
        print(f"+++ {n} tokens: {tok.decode(toks[:n])!r}")
        print(f"    ids: {toks[:n].tolist()}")
    if _SPEAK.value:
        return _speak([tok.decode(toks[:n]) for toks, n in zip(out.tokens[:len(prompts)], out.lengths)])
    return 0


def _stream(model, inputs, sampling, tok) -> int:
    """--stream: the answer printed piece by piece as the chunked decode produces it (`ming_jax.gen.stream`)."""
    from ming_jax.gen import stream

    if inputs.input_ids.shape[0] != 1:
        raise app.UsageError(f"--stream prints one answer: give one prompt (and a --mesh that does not split the "
                             f"batch); got {inputs.input_ids.shape[0]} rows")
    t0 = time.perf_counter()
    pieces = []
    with _mesh_context():
        for piece in stream.stream_generate(model, inputs, sampling, tok, seed=_SEED.value):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
    sys.stdout.write("\n")
    sys.stderr.write(f"done in {time.perf_counter() - t0:.1f} s (including compilation)\n")
    return _speak(["".join(pieces)]) if _SPEAK.value else 0


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
