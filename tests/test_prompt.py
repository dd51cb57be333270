"""Prompt building against the official processor's layout (expected strings written by hand from
processing_bailingmm2.py), with a stand-in tokenizer.json built here with the `tokenizers` library; bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.processors import prompt as P
from ming_jax.processors.image import ProcessorConfig
from ming_jax.processors.video import VideoSamplingConfig, video_from_frames
from ming_jax.processors.tokenizer import ReleaseTokenizer

SYSTEM = "<role>SYSTEM</role>你是一个友好的AI助手。\n\ndetailed thinking off<|role_end|>"
CFG = OmniConfig.tiny()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A real tokenizer.json (byte-level BPE + the release's special strings at the tiny config's ids), loaded the
    way a release folder's tokenizer is."""
    folder = tmp_path_factory.mktemp("tokenizer")
    P.StandInTokenizer(P.tiny_special_ids(CFG.llm)).save(str(folder))
    return ReleaseTokenizer(str(folder))


@pytest.fixture(scope="module")
def builder(tok):
    return P.PromptBuilder.for_model(tok, CFG, video=VideoSamplingConfig(min_pixels=64 * 64))


def image(h=64, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def clip(seconds=0.46, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32), 16000


def four_frame_video():
    return video_from_frames(np.stack([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(4)]), fps=2.0,
                             cfg=VideoSamplingConfig(min_pixels=64 * 64))


# --- chat format -----------------------------------------------------------------------------------------------------


def test_chat_template_layout():
    conv = [{"role": "HUMAN", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Describe."}]}]
    want = SYSTEM + "<role>HUMAN</role><IMAGE>Describe.<|role_end|><role>ASSISTANT</role>"
    assert P.apply_chat_template(conv) == want
    multi = [
        {"role": "HUMAN", "content": [{"type": "image", "image": ["a.jpg", "b.jpg"]},
                                      {"type": "audio", "audio": ["x.wav", "y.wav"]},
                                      {"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Hi"}]},
        {"role": "ASSISTANT", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "HUMAN", "content": "And now?"},
    ]
    assert P.apply_chat_template(multi, system="Be brief.", thinking=True) == (
        "<role>SYSTEM</role>Be brief.\n\ndetailed thinking on<|role_end|>"
        "<role>HUMAN</role><IMAGE>\n<IMAGE><AUDIO>\n<AUDIO><VIDEO>Hi<|role_end|>"
        "<role>ASSISTANT</role>Hello<|role_end|>"
        "<role>HUMAN</role>And now?<|role_end|><role>ASSISTANT</role>")
    assert P.media_items(multi) == {"image": ["a.jpg", "b.jpg"], "video": ["v.mp4"], "audio": ["x.wav", "y.wav"]}


def test_contextual_asr_prompt():
    assert P.asr_prompt() == "Please recognize the language of this speech and transcribe it. Format: oral."
    assert P.asr_prompt("Culinary Traditions", ["Gansu Province", "Uyghur", " "]) == (
        "Please recognize the language of this speech and transcribe it. Format: oral."
        "This is an audio about Culinary Traditions."
        "This audio may contains the following words or phrases:Gansu Province,Uyghur.")
    conv = P.asr_conversation("x.wav", topic="cooking")
    assert P.apply_chat_template(conv).endswith(
        "<role>HUMAN</role>" + P.asr_prompt("cooking") + "<AUDIO><|role_end|><role>ASSISTANT</role>")


def test_expansion_layout():
    text = "a<IMAGE>b<VIDEO>c<AUDIO>d"
    out = P.expand_placeholders(text, image_grids=[(1, 4, 6)], video_grids=[(2, 4, 4)],
                                video_timestamps=[[0.25, 1.25]], audio_tokens=[12])
    assert out == ("a<image>" + "<imagePatch>" * 6 + "</image>\nb"
                   "<video><0.2 seconds><image>" + "<framePatch>" * 4 + "</image>"
                   "<1.2 seconds><image>" + "<framePatch>" * 4 + "</image></video>c"
                   "<audio>" + "<audioPatch>" * 12 + "</audio>d")
    flat = P.expand_placeholders("<VIDEO>", video_grids=[(2, 4, 4)], interleaved=False)
    assert flat == "<video>" + "<framePatch>" * 8 + "</video>\n"


def test_release_special_ids(reference_dir):
    cfg = json.loads((reference_dir / "tokenizer_config.json").read_text())
    sp = P.SpecialTokens.from_tokenizer_config(cfg)
    assert (sp.image_patch, sp.image_start, sp.image_end, sp.video_start, sp.video_end) == (
        157157, 157158, 157159, 157160, 157161)
    assert (sp.audio_patch, sp.audio_start, sp.audio_end, sp.frame_patch, sp.role_end) == (
        157168, 157169, 157170, 157175, 156895)
    sp.check_model(LLMConfig.ming_flash_omni_2())  # the release's tokenizer and LLM config agree
    assert LLMConfig.ming_flash_omni_2().eos_ids == (sp.role_end,)


# --- whole prompts ----------------------------------------------------------------------------------------------------


def test_build_layout(builder, tok):
    conv = [{"role": "HUMAN", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image", "image": image()},
        {"type": "audio", "audio": clip()}, {"type": "video", "video": four_frame_video()},
        {"type": "text", "text": "What?"}]}]
    x = builder.build(conv)
    # 64x96 image -> grid (1, 4, 6) -> 6 tokens; 0.46 s -> 46 mel frames -> 23 -> 12 audio tokens; the 4-frame
    # 64x64 video -> grid (2, 4, 4) -> 2 temporal patches of 4 tokens at 0.25 s and 1.25 s.
    want = (SYSTEM + "<role>HUMAN</role>Look:"
            "<image>" + "<imagePatch>" * 6 + "</image>\n"
            "<audio>" + "<audioPatch>" * 12 + "</audio>"
            "<video><0.2 seconds><image>" + "<framePatch>" * 4 + "</image>"
            "<1.2 seconds><image>" + "<framePatch>" * 4 + "</image></video>"
            "What?<|role_end|><role>ASSISTANT</role>")
    assert x.text == want
    assert x.input_ids.tolist() == [tok.encode(want)] and x.input_ids.dtype == np.int64
    assert x.attention_mask.shape == x.input_ids.shape and x.attention_mask.all()
    assert x.pixel_values.shape == (24, 1536) and x.image_grid_thw.tolist() == [[1, 4, 6]]
    assert x.pixel_values_videos.shape == (32, 1536)
    assert x.video_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]  # one t=1 row per temporal patch (interleaved)
    assert x.audio_feats.shape == (1, 46, 128) and x.audio_feats_lengths.tolist() == [[46]]
    start = x.input_ids[0].tolist().index(tok.token_id("<audio>")) + 1
    assert x.audio_placeholder_loc_lens.tolist() == [[[start, 12]]]
    ids = x.input_ids[0]
    assert (ids[start:start + 12] == tok.token_id("<audioPatch>")).all()
    assert (ids == CFG.llm.image_patch_token).sum() == 6 and (ids == CFG.llm.video_patch_token).sum() == 8


@pytest.mark.parametrize("seconds", [0.46, 1.3, 2.0, 3.01])
def test_audio_placeholder_lengths_follow_mel_lengths(builder, seconds):
    x = builder.build_text("<AUDIO>", audios=[clip(seconds)])
    mel = int(seconds * 16000) // 160  # whisper: one frame per 10 ms
    enc = (mel - 1) // 2 + 1  # whisper's stride-2 conv
    tokens = (enc - 3 + 2) // 2 + 1  # the projector's k3 s2 conv
    assert x.audio_feats_lengths.tolist() == [[mel]]
    assert x.audio_placeholder_loc_lens[0, 0, 1] == tokens == CFG.audio.output_frames(mel)


def test_two_clips_and_answer_prefix(builder, tok):
    x = builder.build(P.asr_conversation([clip(0.46, 1), clip(0.3, 2)]), assistant_prefix="English\t")
    assert x.text.endswith("<|role_end|><role>ASSISTANT</role>English\t")
    assert x.audio_feats.shape[1] == 46 + 30 and x.audio_feats_lengths.tolist() == [[46, 30]]
    spans = x.audio_placeholder_loc_lens[0].tolist()
    assert [n for _, n in spans] == [12, 8] and spans[1][0] > spans[0][0] + 12


def test_image_file_and_small_images(builder, tmp_path):
    Image.fromarray(image(40, 40)).save(tmp_path / "small.png")
    x = builder.build_text("<IMAGE>", images=[str(tmp_path / "small.png")])
    assert x.image_grid_thw.tolist() == [[1, 4, 4]]  # 1600 < min_pixels 4096: upscaled to 64x64, as the release
    strict = P.PromptBuilder.for_model(builder.tokenizer, CFG, upscale_small_images=False)
    with pytest.raises(P.PromptError, match="below min_pixels=4096"):
        strict.build_text("<IMAGE>", images=[str(tmp_path / "small.png")])


# --- bad input --------------------------------------------------------------------------------------------------------


def test_placeholder_media_mismatch(builder):
    with pytest.raises(P.PromptError, match=r"2 <IMAGE> placeholder\(s\) but 1 image"):
        builder.build_text("<IMAGE><IMAGE>", images=[image()])
    with pytest.raises(P.PromptError, match=r"0 <AUDIO> placeholder\(s\) but 1 audio"):
        builder.build_text("no placeholder", audios=[clip()])
    with pytest.raises(P.PromptError, match=r"1 <VIDEO> placeholder\(s\) but 0 video"):
        builder.build_text("<VIDEO>")
    with pytest.raises(P.PromptError, match="reserved placeholder"):
        builder.build([{"role": "HUMAN", "content": "see <IMAGE> here"}])
    with pytest.raises(P.PromptError, match="last message must be the human"):
        P.apply_chat_template([{"role": "HUMAN", "content": "a"}, {"role": "ASSISTANT", "content": "b"}])
    with pytest.raises(P.PromptError, match="role"):
        P.apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(P.PromptError, match="at most one video"):
        P.apply_chat_template([{"role": "HUMAN", "content": [{"type": "video", "video": "a"},
                                                             {"type": "video", "video": "b"}]}])


def test_unreadable_and_empty_media(builder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(P.PromptError, match="image 0: cannot read"):
        builder.build_text("<IMAGE>", images=[str(bad)])
    with pytest.raises(P.PromptError, match="image 0: file not found"):
        builder.build_text("<IMAGE>", images=[str(tmp_path / "none.png")])
    with pytest.raises(P.PromptError, match="empty side"):
        builder.build_text("<IMAGE>", images=[np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(P.PromptError, match="empty"):
        builder.build_text("<AUDIO>", audios=[(np.zeros(0, np.float32), 16000)])
    with pytest.raises(P.PromptError, match="audio clip 0: audio file not found"):
        builder.build_text("<AUDIO>", audios=[str(tmp_path / "none.wav")])
    with pytest.raises(P.PromptError, match="video 0: video file not found"):
        builder.build_text("<VIDEO>", videos=[str(tmp_path / "none.mp4")])


def test_limits(builder, tok):
    short = P.PromptBuilder.for_model(tok, CFG, max_context=20)
    with pytest.raises(P.PromptError, match="longer than the model's context of 20"):
        short.build_text("x" * 21)
    with pytest.raises(P.PromptError, match=r"\+ 5 new"):
        short.build_text("x" * 16, max_new_tokens=5)
    n_ctx_300 = P.PromptBuilder.for_model(tok, CFG.replace(audio=dict(n_ctx=300)))
    with pytest.raises(P.PromptError, match="at most 600"):
        n_ctx_300.build_text("<AUDIO>", audios=[clip(7.0)])


def test_tokenizer_and_model_must_agree(tok):
    partial = P.StandInTokenizer({k: v for k, v in P.tiny_special_ids(CFG.llm).items() if "audio" not in k})
    with pytest.raises(P.PromptError, match="no token for"):
        P.PromptBuilder(partial)
    with pytest.raises(P.PromptError, match="disagree"):
        P.PromptBuilder.for_model(tok, CFG.replace(llm=dict(image_patch_token=5)))
    no_audio = CFG.replace(audio=None)
    with pytest.raises(P.PromptError, match="no audio tower"):
        P.PromptBuilder.for_model(tok, no_audio).build_text("<AUDIO>", audios=[clip()])
    with pytest.raises(P.PromptError, match="mel bins"):
        P.PromptBuilder.for_model(tok, CFG.replace(audio=dict(n_mels=80)))
    with pytest.raises(P.PromptError, match="patch geometry"):
        P.PromptBuilder.for_model(tok, CFG, ProcessorConfig.ming_flash_omni_2(patch_size=14))
