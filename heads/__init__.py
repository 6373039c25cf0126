"""Question encoders, fusion (BAN, SAN) and answer heads over precomputed image features.

    from heads import QuestionEncoderConfig, create_head, loss_for_head
    head = create_head("mevf-ban", feature_dim=768, vocab_sizes={"answers": 458},
                       question_encoder=QuestionEncoderConfig(vocab_size=1200))
    out = head({"grid": grid, "pooled": pooled}, tokens, lengths)  # {"logits", "attention"}
    losses = loss_for_head(head)(out, answer_index)                # {"loss", "answer_loss"}

Imports torch and numpy only. A pretrained text model as the question side is a module built
elsewhere (`encoders.TextQuestionEncoder`) and passed in as `question_encoder`.
"""
from . import ensemble, mevf, multiple_choice, qcr, transformer  # noqa: F401  (registers the heads)
from ._registry import create_head, get_head_class, head_from_dict, head_to_dict, list_heads, register_head
from .ensemble import EnsembleHead, EnsembleHeadConfig
from .base import ANSWER_TYPES, CLOSED, OPEN, VQAHead, create_question_encoder, question_encoder_spec
from .fusion import BilinearAttentionFusion, StackedAttentionFusion
from .layers import MASKED_LOGIT
from .losses import AnswerLoss, MultipleChoiceLoss, QCRLoss, loss_for_head, soft_targets
from .mevf import BANHeadConfig, MEVFBANHead, MEVFSANHead, SANHeadConfig
from .multiple_choice import MultipleChoiceBANHead, MultipleChoiceHeadConfig
from .qcr import QCRHead, QCRHeadConfig
from .transformer import (FusionTransformerHead, MultipleChoiceTransformerHead, RoutedFusionTransformerHead,
                          RoutedTransformerHeadConfig, TransformerFusion, TransformerHeadConfig)
from .question import QuestionEncoder, QuestionEncoderConfig, load_glove

__all__ = [
    "ANSWER_TYPES", "CLOSED", "MASKED_LOGIT", "OPEN",
    "AnswerLoss", "BANHeadConfig", "EnsembleHead", "EnsembleHeadConfig", "BilinearAttentionFusion", "FusionTransformerHead", "MEVFBANHead",
    "MultipleChoiceTransformerHead", "RoutedFusionTransformerHead", "RoutedTransformerHeadConfig",
    "TransformerFusion", "TransformerHeadConfig", "MEVFSANHead", "MultipleChoiceBANHead",
    "MultipleChoiceHeadConfig", "MultipleChoiceLoss", "QCRHead", "QCRHeadConfig", "QCRLoss",
    "QuestionEncoder", "QuestionEncoderConfig", "SANHeadConfig", "StackedAttentionFusion", "VQAHead",
    "create_head", "create_question_encoder", "get_head_class", "head_from_dict", "head_to_dict",
    "list_heads", "load_glove", "loss_for_head", "question_encoder_spec", "register_head", "soft_targets",
]
