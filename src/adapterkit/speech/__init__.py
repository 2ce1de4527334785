"""Speech tasks on adapted encoders: heads (CTC, utterance classes, speaker embeddings) and metrics."""

from adapterkit.speech.heads import CTCHead, SpeakerHead, UtteranceHead, cosine_scores, frame_mask, masked_mean
from adapterkit.speech.metrics import cer, edit_distance, eer, min_dcf, wer

__all__ = [
    "CTCHead",
    "SpeakerHead",
    "UtteranceHead",
    "cer",
    "cosine_scores",
    "edit_distance",
    "eer",
    "frame_mask",
    "masked_mean",
    "min_dcf",
    "wer",
]
