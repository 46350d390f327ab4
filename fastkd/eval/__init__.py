"""k-NN and linear-probe evaluation of frozen features."""

from fastkd.eval.evaluate import evaluate_knn, evaluate_linear, split_features
from fastkd.eval.features import FeatureSet, cached_features, extract_features
from fastkd.eval.knn import KNNResult, knn_classify
from fastkd.eval.linear_probe import LinearProbeResult, train_linear_probe
from fastkd.eval.models import load_eval_model

__all__ = [
    "FeatureSet",
    "KNNResult",
    "LinearProbeResult",
    "cached_features",
    "evaluate_knn",
    "evaluate_linear",
    "extract_features",
    "knn_classify",
    "load_eval_model",
    "split_features",
    "train_linear_probe",
]
