"""Host-side preprocessing front ends: audio (waveform -> whisper log-mel) and image (RGB -> ViT patch rows).

Both are numpy (+ soundfile / PyAV / PIL) re-implementations of the official Ming processors, bit-for-bit where the official
is deterministic integer / float32 arithmetic (image), and to float32 rounding where it runs FFTs (audio).
"""

from ming_jax.processors.audio import (SAMPLE_RATE, AudioError, WhisperFrontendConfig, encoder_output_length,
                                       load_audio, log_mel_spectrogram, prepare_waveform, process_audios, resample,
                                       whisper_frontend)
from ming_jax.processors.image import (ImageError, ProcessorConfig, num_image_patches, process_image, process_images,
                                       smart_resize)

__all__ = [
    "SAMPLE_RATE", "AudioError", "WhisperFrontendConfig", "encoder_output_length", "load_audio",
    "log_mel_spectrogram", "prepare_waveform", "process_audios", "resample", "whisper_frontend",
    "ImageError", "ProcessorConfig", "num_image_patches", "process_image", "process_images", "smart_resize",
]
