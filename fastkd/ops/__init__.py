"""Fused operators. Each op lives in its own file: torch.library registration, autograd, fake (meta)
implementation and its implementations (Triton on CUDA, C++ on CPU, a PyTorch path anywhere), entered
through the one dispatch rule of ``fastkd.ops._dispatch``. Each op module's docstring states its math.

``with fastkd.ops.reference_ops():`` routes every op to its plain PyTorch ``*_reference``."""

from .feature_align import LOSSES, TARGET_NORMS, feature_align, feature_align_reference  # noqa: F401
from .gather_tokens import gather_tokens, gather_tokens_reference  # noqa: F401
from .token_masks import random_keep, topk_keep  # noqa: F401
from .token_relation import DIRECTIONS, HEAD_MAPS, token_relation, token_relation_reference  # noqa: F401
from .reduction import REDUCTIONS  # noqa: F401
from .reference_mode import CPU_REFERENCE_BELOW, fused_kernels_always, reference_ops, reference_ops_enabled  # noqa: F401
from ._extension import build_info  # noqa: F401
from .ema import EMAGap, ema_, ema_reference, ema_unless_  # noqa: F401
