"""csm-train: train Sesame's Conversational Speech Model from scratch."""

from csm_train.layout import Frames, Segment, collate, conversation_frames
from csm_train.loss import LossOutput, csm_loss, decoder_frame_generator, select_decoder_frames
from csm_train.model import CSM, CSMConfig, CSMOutput, TransformerConfig

__all__ = [
    "CSM",
    "CSMConfig",
    "CSMOutput",
    "Frames",
    "LossOutput",
    "Segment",
    "TransformerConfig",
    "collate",
    "conversation_frames",
    "csm_loss",
    "decoder_frame_generator",
    "select_decoder_frames",
]
