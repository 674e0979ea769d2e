"""Evaluation of CLIP-style models with the paper's protocols: zero-shot classification, image-text retrieval
and linear probing, on any `datasets` dataset. Needs the `eval` extra (`pip install "rwkv-clip-hf[eval]"`).

The command line is `rwkv-clip-eval zero-shot|retrieval|linear-probe` (see `cli.py`); the functions below are
the same steps for use from Python.
"""

from .data import EvalData, load_eval_dataset
from .features import (
    FeatureCache,
    FeatureExtractor,
    encode_images,
    encode_texts,
    load_model_and_processor,
    model_fingerprint,
)
from .linear_probe import linear_probe
from .retrieval import evaluate_retrieval, retrieval_metrics
from .zero_shot import (
    build_classifier,
    bundled_zero_shot_data,
    classification_metrics,
    evaluate_zero_shot,
    resolve_benchmark,
    zero_shot_logits,
)

__all__ = [
    "EvalData",
    "FeatureCache",
    "FeatureExtractor",
    "build_classifier",
    "bundled_zero_shot_data",
    "classification_metrics",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "linear_probe",
    "load_eval_dataset",
    "load_model_and_processor",
    "model_fingerprint",
    "resolve_benchmark",
    "retrieval_metrics",
    "zero_shot_logits",
]
