"""Fused operators, one per module: its math (module docstring), validation, plain PyTorch ``*_reference``
and ``torch.ops.fastkd`` kernels, routed once through ``fastkd.ops._dispatch``.
``with fastkd.ops.reference_ops():`` routes every op to its ``*_reference``."""

from .feature_align import LOSSES, TARGET_NORMS, feature_align, feature_align_reference  # noqa: F401
from .gather_tokens import gather_tokens, gather_tokens_reference  # noqa: F401
from .token_masks import random_keep, topk_keep  # noqa: F401
from .token_relation import DIRECTIONS, HEAD_MAPS, token_relation, token_relation_reference  # noqa: F401
from .reduction import REDUCTIONS  # noqa: F401
from ._dispatch import reference_ops, reference_ops_enabled  # noqa: F401
from ._extension import build_info  # noqa: F401
from .ema import EMAGap, ema_, ema_reference, ema_unless_  # noqa: F401
