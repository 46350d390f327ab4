"""Drop-in ``nn.Module`` losses built on fastkd's fused ops."""

from fastkd.losses.dino import DINOLoss
from fastkd.losses.feature_align import FeatureAlignLoss
from fastkd.losses.infonce import InfoNCELoss, infonce
from fastkd.losses.residual_momentum import ResidualMomentumLoss
from fastkd.losses.token_relation import TokenRelationLoss
