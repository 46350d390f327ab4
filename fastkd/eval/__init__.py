"""Evaluation of saved models: k-NN, the cached linear probe, the papers' linear protocols (DINO, MoCo v3)
and end-to-end fine-tuning (DeiT / MAE recipe)."""

from fastkd.eval.evaluate import (FeatureSet, cached_features, evaluate_knn, evaluate_linear, extract_features,
                                  split_features)
from fastkd.eval.finetune import FINETUNE_RECIPES, FinetuneRecipe, FinetuneResult, finetune, load_finetuned
from fastkd.eval.knn import KNNResult, knn_classify
from fastkd.eval.linear_probe import LinearProbeResult, train_linear_probe
from fastkd.eval.linear_protocols import (LINEAR_PROTOCOLS, LinearProtocol, LinearProtocolResult,
                                          evaluate_linear_protocol)
from fastkd.eval.models import load_eval_model, load_eval_model_described

__all__ = ["FINETUNE_RECIPES", "FeatureSet", "FinetuneRecipe", "FinetuneResult", "KNNResult", "LINEAR_PROTOCOLS",
           "LinearProbeResult", "LinearProtocol", "LinearProtocolResult", "cached_features", "evaluate_knn",
           "evaluate_linear", "evaluate_linear_protocol", "extract_features", "finetune", "knn_classify",
           "load_eval_model", "load_eval_model_described", "load_finetuned", "split_features", "train_linear_probe"]
