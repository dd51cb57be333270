"""Make the talker-prompt reference: the official `BailingTalker2.omni_audio_generation_func` (the talker's chat
prompt, its speaker and voice-prompt rows) and the official `create_instruction` (test_talker.py), run on a small
trained byte-level BPE tokenizer.

    python tools/make_talker_prompt_reference.py --official /path/to/Ming2 --out tests/data/talker_prompt_reference

`--official` is a folder holding the release's python files, unmodified (a scratch export of github
Zihhan318/Ming2, snapshot 2a3732a; the blob ids it was run with are written to the output's README.md). Nothing of
the official code is stored in this project; this script imports it from that folder. Run it outside the test suite
(it needs torch and transformers); `tests/test_tts.py` reads only what it writes.

What it does around the official code at run time (files untouched):
1. Trains a byte-level BPE (600 ids, the Qwen2 pre-tokenizer regex, NFC) on a small fixed English / Chinese corpus
   that includes the talker's prompt strings, with the talker's special tokens added, and saves it as
   `tokenizer.json`; the official code sees it through `transformers.Qwen2TokenizerFast` (the class the release's
   `AutoTokenizer` resolves to for a Qwen2 tokenizer folder).
2. Imports modeling_bailing_talker.py with stand-ins for the modules the prompt code does not use (the talker's
   text normaliser, its flow / aggregator modules, the text front end, torchaudio, onnxruntime, loguru, yaml).
3. Calls `BailingTalker2.omni_audio_generation_func` on a bare namespace holding the tokenizer, an embedding table
   whose row i is [i, 0] and a `generate` that records what it is given; speaker embeddings are rows [k, 1] and
   voice-prompt embeddings [j, 2], so the recorded embeddings say, per position, the token id or which speaker /
   prompt patch replaced it. The prompt string the official code logs is recorded too.
4. Imports test_talker.py with stand-ins for its model imports (peft, torchaudio, loguru, the release's model files)
   and calls `Talker.create_instruction` on the instruction examples, json.dumps(ensure_ascii=False) as its
   `speech_generation` does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import types

OFFICIAL_FILES = ("modeling_bailing_talker.py", "configuration_bailing_talker.py", "test_talker.py")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<audio>", "<audioPatch>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "You are a helpful assistant.", "Please generate speech based on the following description.",
    "Please generate music based on the following description.", "Please generate audio events based on given text.",
    " Text input:", "  speaker_1:", "  speaker_2:", "system", "user", "assistant",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test sentence.",
    "这是一条测试语句。欢迎使用百灵。你可以问我一些问题。感谢你的认可。",
    "我们的愿景是构建未来服务业的数字化基础设施，为世界带来更多微小而美好的改变。",
    "Genre: Celtic folk. Mood: excited. Instrument: accordion. Theme: travel. Duration: 60s.",
    '{"audio_sequence": [{"序号": 1, "说话人": "speaker_1", "方言": null, "风格": null, "情感": "高兴"}]}',
    "A person is snoring. Birds chirping in the morning. 1234567890",
]
TEXTS = {
    "mixed": "这是一条测试语句。Hello world 123!",
    "english": "The quick brown fox jumps over the lazy dog.",
    "bgm": " Genre: Celtic folk. Mood: excited. Instrument: accordion. Theme: travel. Duration: 60s.",
    "podcast": " speaker_1:你好，今天聊什么？\n speaker_2:聊聊旅行吧。\n",
    "split": "可。这是一条测试语句。",
}
SPEECH = "Please generate speech based on the following description.\n"
# (name, task prompt, text key, speakers ("zero" or a count), prompt text, prompt patches, instruction example)
CASES = [
    ("plain", SPEECH, "mixed", 0, None, 0, None),
    ("zero_shot", SPEECH, "mixed", 1, "感谢你的认可。", 5, None),
    ("emotion_no_prompt_text", SPEECH, "english", 1, None, 4, "emotion"),
    ("bgm", "Please generate music based on the following description.\n", "bgm", 0, None, 0, None),
    ("podcast", SPEECH, "podcast", 2, " speaker_1:我们还要考核\n speaker_2:对啊\n", 3, None),
    ("style_zero_speaker", SPEECH, "mixed", "zero", None, 0, "style"),
    ("tta", "Please generate audio events based on given text.\n", "english", 0, None, 0, None),
    ("empty_prompt_text", SPEECH, "english", 1, "", 2, "basic"),
    # a word split between the prompt text and the text: piece-wise ids differ from the joined string's
    ("split_word", SPEECH, "split", 1, "感谢你的认", 2, None),
]
INSTRUCTIONS = {
    "emotion": {"情感": "高兴"},
    "basic": {"语速": "快速", "基频": "中", "音量": "中"},
    "dialect": {"方言": "广粤话"},
    "style": {"风格": "性别: 男性嗓音.\n\n语速: 整体语速偏快."},
    "ip": {"IP": "水浒传_武松"},
    "speech_bgm": {"BGM": {"Genre": "新灵魂乐.", "Mood": "忧郁.", "Instrument": "原声钢琴.", "Theme": "分手.",
                           "SNR": 10.0, "ENV": None}},
    "speech_sound": {"BGM": {"ENV": "Birds chirping", "SNR": 10.0, "Genre": None, "Mood": None, "Instrument": None,
                             "Theme": None}},
    "bgm_without_snr": {"BGM": {"Genre": "爵士.", "SNR": None}, "情感": "平静"},
    "unknown_key_ignored": {"情感": "悲伤", "not_an_attribute": 1},
}
HIDDEN = 2  # embedding width of the recording table


def blob_id(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def train_tokenizer(out_dir: str) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path


def _module(name: str, **attrs) -> types.ModuleType:
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = mod
    return mod


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg, *a, **k):
        self.lines.append(msg)

    warning = debug = error = info


def install_stubs(log: _Log) -> None:
    stub = type("Stub", (), {"__init__": lambda self, *a, **k: None})
    try:
        import yaml  # noqa: F401  (the official file imports it; only a stand-in when it is not installed)
    except ImportError:
        _module("yaml")
    _module("loguru", logger=log)
    _module("onnxruntime")
    ta = _module("torchaudio")
    ta.compliance = _module("torchaudio.compliance")
    ta.compliance.kaldi = _module("torchaudio.compliance.kaldi")
    ta.transforms = _module("torchaudio.transforms")
    _module("peft", PeftModel=stub)
    _module("talker_tn")
    _module("talker_tn.talker_tn", TalkerTN=stub)
    _module("talker_module")
    _module("talker_module.cfm", CFM=stub, get_epss_timesteps=lambda *a, **k: None)
    _module("talker_module.dit", DiT=stub)
    _module("talker_module.aggregator", Aggregator=stub)
    _module("front")
    _module("front.number_en", normalize_numbers=lambda s: s)
    _module("front.text_segment_cut", cut_text_by_semantic_length=lambda *a, **k: None, is_chinese=lambda s: False)
    _module("front.toolkit", tokenize_mixed_text_iterator=lambda s: iter([s]))
    _module("AudioVAE")
    _module("AudioVAE.modeling_audio_vae", AudioVAE=stub)


def load(official: str, name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(official, file))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="folder with the release's python files")
    ap.add_argument("--out", default="tests/data/talker_prompt_reference")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = _Log()
    import torch
    import transformers
    from transformers import AutoProcessor, PreTrainedModel, Qwen2Model, Qwen2TokenizerFast, StaticCache  # noqa: F401

    install_stubs(log)  # after transformers has looked for its optional packages
    sys.path.insert(0, args.official)

    tok_path = train_tokenizer(args.out)
    tokenizer = Qwen2TokenizerFast(tokenizer_file=tok_path)
    modeling = load(args.official, "modeling_bailing_talker", "modeling_bailing_talker.py")
    test_talker = load(args.official, "test_talker", "test_talker.py")

    instructions = {k: json.dumps(test_talker.Talker.create_instruction(None, v), ensure_ascii=False)
                    for k, v in INSTRUCTIONS.items()}

    vocab = len(tokenizer)
    table = torch.nn.Embedding(vocab, HIDDEN)
    with torch.no_grad():
        table.weight.zero_()
        table.weight[:, 0] = torch.arange(vocab, dtype=torch.float32)
    recorded = {}

    def generate(inputs_embeds, prompt_wav_lat=None, **kwargs):
        recorded["embeds"] = inputs_embeds
        recorded["lat"] = prompt_wav_lat
        recorded["kwargs"] = kwargs
        return iter(())

    ns = types.SimpleNamespace(tokenizer=tokenizer, device="cpu", generate=generate,
                               model=types.SimpleNamespace(get_input_embeddings=lambda: table))
    cases = []
    for name, prompt, text_key, speakers, prompt_text, patches, instruction in CASES:
        if speakers == "zero":
            spk = torch.zeros(1, HIDDEN)  # the release's use_zero_spk_emb tensor, iterated row by row
            spk[0, 1] = 1.0
        else:
            spk = [torch.tensor([[float(k), 1.0]]) for k in range(speakers)] or None
        wav_emb = None if patches == 0 else torch.stack([torch.tensor([float(j), 2.0]) for j in range(patches)])[None]
        wav_lat = None if patches == 0 else torch.zeros(1, 4 * patches, 3)
        log.lines.clear()
        with torch.no_grad():
            list(modeling.BailingTalker2.omni_audio_generation_func(
                ns, prompt=prompt, text=TEXTS[text_key], spk_emb=spk,
                instruction=None if instruction is None else instructions[instruction], prompt_text=prompt_text,
                prompt_wav_lat=wav_lat, prompt_wav_emb=wav_emb))
        rows = recorded["embeds"][0].round().to(torch.int64).tolist()
        cases.append(dict(name=name, task_prompt=prompt, text=TEXTS[text_key], speakers=speakers,
                          prompt_text=prompt_text, prompt_patches=patches, instruction=instruction,
                          rows=rows, logged=log.lines[-1]))
    out = dict(cases=cases, instructions={k: dict(input=INSTRUCTIONS[k], json=v) for k, v in instructions.items()},
               texts=TEXTS)
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:  # one case / instruction a line
        f.write("{\n" + ",\n".join(
            f"{json.dumps(k)}: " + ("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in v) + "\n]"
                                    if isinstance(v, list) else
                                    "{\n" + ",\n".join(f"{json.dumps(n)}: {json.dumps(c, ensure_ascii=False)}"
                                                        for n, c in v.items()) + "\n}")
            for k, v in out.items()) + "\n}\n")
    blobs = {f: blob_id(os.path.join(args.official, f)) for f in OFFICIAL_FILES}
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("Talker prompt reference, written by tools/make_talker_prompt_reference.py (do not edit).\n\n"
                "* `tokenizer.json`: the byte-level BPE the script trains (600 ids, the talker's special tokens).\n"
                "* `cases.json`: per case, the official `omni_audio_generation_func`'s prompt embeddings as\n"
                "  [value, kind] rows (kind 0: token id `value`; 1: speaker `value`'s embedding; 2: voice-prompt\n"
                "  patch `value`), and the prompt string it logs; the official `create_instruction` JSONs.\n\n"
                "Official files (git blob ids):\n\n"
                + "".join(f"* `{k}` {v}\n" for k, v in blobs.items())
                + f"\ntorch {torch.__version__}, transformers {transformers.__version__}, tokenizers "
                  f"{__import__('tokenizers').__version__}\n")
    print(f"wrote {len(cases)} prompt cases and {len(instructions)} instructions to {args.out}")


if __name__ == "__main__":
    main()
