"""Distillation and teacher-pretraining methods: ``nn.Module``s mapping a batch to a dict of losses.

Each method is one module of this package whose :class:`Method` subclass sets ``name``; importing
the package registers them all (:func:`fastkd.methods.registry.discover`)."""

from fastkd.methods.base import ROLES, Method
from fastkd.methods.hybrid_distill import HybridDistill, HybridDistillConfig, cls_attention_scores
from fastkd.methods.mae import MAE, MAEConfig
from fastkd.methods.mocov3 import MoCoV3, MoCoV3Config
from fastkd.methods.mokd import MOKD, MOKDConfig
from fastkd.methods.moma import MOMA, MOMAConfig
from fastkd.methods.registry import METHODS, build_method, discover, method_class, method_names
from fastkd.methods.resmoco import ResMoCo, ResMoCoConfig

discover()
