"""Golden kind `preprocessing`: the official WhisperFrontend log-mel and BailingMM2ImageProcessor on fixed inputs.

The case's config.json carries the audio processor keys (sampling_rate, whisper_frontend_args); keys it lacks take
the values of the shipped Ming-flash-omni 2.0 preprocessor_config.json, which is what the generator used for the
image processor. The waveform is fed to the log-mel front end as is (the generator ran WhisperFrontend alone, without
the processor's normalise / resample step).
"""

from __future__ import annotations

from ming_jax.parity import golden, numerics
from ming_jax.processors import ProcessorConfig, process_images, whisper_frontend


def run(case: golden.GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    """Host numpy preprocessing: the same exact / float32 comparison in every mode."""
    del mode
    cfg = ProcessorConfig.from_official(case.config, defaults=ProcessorConfig.ming_flash_omni_2())
    rows: list[numerics.Comparison] = []
    if "waveform" in case.inputs:
        mel, mel_len = whisper_frontend(case.inputs["waveform"], cfg.audio.n_mels)  # [1, T, n_mels], [1]
        rows.append(numerics.compare("whisper_log_mel", mel, case.outputs["whisper_log_mel"]))
        rows.append(numerics.compare("whisper_log_mel_len", mel_len, case.outputs["whisper_log_mel_len"]))
    if "image_uint8" in case.inputs:
        out = process_images([case.inputs["image_uint8"]], cfg)
        rows.append(numerics.compare("image_pixel_values", out["pixel_values"], case.outputs["image_pixel_values"]))
        rows.append(numerics.compare("image_grid_thw", out["image_grid_thw"], case.outputs["image_grid_thw"]))
    return rows
