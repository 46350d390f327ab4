"""timm backbones with pluggable attention and a masked encoder, heads, the EMA teacher and backbone weights."""

from fastkd.models.backbone import Backbone, Features, build_backbone
from fastkd.models.dino_head import DINOHead
from fastkd.models.ema_teacher import EMATeacher, momentum_schedule
from fastkd.models.mae_decoder import MAEDecoder, masked_pixel_loss, patchify
from fastkd.models.moco_heads import MoCoPredictor, MoCoProjector, convert_sync_batchnorm
from fastkd.models.projectors import LinearProjector, MLPProjector
from fastkd.models.thead import THead
from fastkd.models.weights import CheckpointError, load_teacher, save_backbone

__all__ = ["Backbone", "CheckpointError", "DINOHead", "EMATeacher", "Features", "LinearProjector", "MAEDecoder",
           "MLPProjector", "MoCoPredictor", "MoCoProjector", "THead", "build_backbone", "convert_sync_batchnorm",
           "load_teacher", "masked_pixel_loss", "momentum_schedule", "patchify", "save_backbone"]
