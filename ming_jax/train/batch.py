"""Train batches from model inputs: next-token targets and loss weights from Hugging Face style `labels` (-100 =
no loss), positions / router modality / media rows from `ming_jax.models.inputs.prepare` (host side, numpy)."""

from __future__ import annotations

import numpy as np

from ming_jax.models.inputs import Prepared

IGNORE = -100  # the label that takes no loss (torch's CrossEntropyLoss default ignore_index)


def from_labels(prep: Prepared, labels) -> dict:
    """A train batch (`ming_jax.train.step`) for inputs `prep` [B, S] and `labels` [B, S]: position t predicts
    labels[t + 1] where that is not IGNORE (the release's shift-by-one loss); padding (attention_mask False) takes
    no loss and is segment 0."""
    labels = np.asarray(labels)
    b, s = prep.input_ids.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels have shape {labels.shape}, input_ids {(b, s)}")
    targets = np.zeros((b, s), np.int32)
    weights = np.zeros((b, s), np.float32)
    nxt = labels[:, 1:]
    targets[:, :-1] = np.where(nxt == IGNORE, 0, nxt)
    weights[:, :-1] = (nxt != IGNORE) & prep.attention_mask[:, 1:] & prep.attention_mask[:, :-1]
    batch = dict(input_ids=prep.input_ids.astype(np.int32), targets=targets, loss_mask=weights,
                 segment_ids=prep.attention_mask.astype(np.int32), positions=prep.positions.astype(np.int32))
    if prep.modality is not None:
        batch["modality"] = prep.modality.astype(np.int32)
    if prep.features is not None:
        batch["features"] = prep.features.astype(np.float32)
        batch["feature_index"] = prep.feature_index.astype(np.int32)
    return batch
