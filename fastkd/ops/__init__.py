"""Fused operators. Each op lives in its own file: validation, its plain PyTorch ``*_reference``, the
fake (meta) and CUDA (Triton) kernels of its ``torch.ops.fastkd`` op (schema, C++ CPU kernel and
autograd in ``csrc/``), and its public function, which routes once through ``fastkd.ops._dispatch``
(CUDA -> Triton, CPU -> C++, else the reference). Each op module's docstring states its math.

``with fastkd.ops.reference_ops():`` routes every op to its plain PyTorch ``*_reference``."""

from .feature_align import LOSSES, TARGET_NORMS, feature_align, feature_align_reference  # noqa: F401
from .gather_tokens import gather_tokens, gather_tokens_reference  # noqa: F401
from .token_masks import random_keep, topk_keep  # noqa: F401
from .token_relation import DIRECTIONS, HEAD_MAPS, token_relation, token_relation_reference  # noqa: F401
from .reduction import REDUCTIONS  # noqa: F401
from ._dispatch import reference_ops, reference_ops_enabled  # noqa: F401
from ._extension import build_info  # noqa: F401
from .ema import EMAGap, ema_, ema_reference, ema_unless_  # noqa: F401
