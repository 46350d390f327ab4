"""Fused operators. Each op lives in its own file: torch.library registration, autograd,
fake (meta) implementation, dispatch to a Triton kernel on CUDA and a C++/PyTorch path on CPU."""

from .feature_align import feature_align, feature_align_reference  # noqa: E402,F401
from .gather_tokens import gather_tokens, gather_tokens_reference  # noqa: E402,F401
from .token_masks import random_keep, topk_keep  # noqa: E402,F401
from .token_relation import token_relation, token_relation_reference  # noqa: E402,F401
from ._extension import build_info  # noqa: E402,F401
from .ema import EMAGap, ema_, ema_reference  # noqa: E402,F401
