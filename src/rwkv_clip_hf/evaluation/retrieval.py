"""Image-text retrieval: recall@K for image->text and text->image with several captions per image.

Image->text: an image counts as retrieved at K when any of its captions is among the K captions most similar
to it. Text->image: a caption counts when its own image is among the K most similar images. Similarity is the
cosine of the embeddings. Ties are ranked by index (a stable sort), so a tie never helps the correct item
unless it comes first.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import EvalData, captions_per_image


def _normalise(features: torch.Tensor) -> torch.Tensor:
    features = features.double()
    return features / features.norm(dim=-1, keepdim=True)


def retrieval_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the first correct item.

    Args:
        image_features: `(num_images, dim)`.
        text_features: `(num_texts, dim)`.
        text_to_image: `(num_texts,)` image index of each caption.

    Returns:
        `(image_ranks, text_ranks)`: for each image, the best rank of its captions among all captions; for
        each caption, the rank of its image among all images.
    """
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    num_images = image_features.shape[0]
    if owner.numel() != text_features.shape[0]:
        raise ValueError(f"{owner.numel()} caption owners for {text_features.shape[0]} captions")
    if owner.numel() and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError("text_to_image holds an index outside the images")
    similarity = _normalise(image_features) @ _normalise(text_features).T  # (images, texts)

    # Position of every text in each image's ranking; an image's rank is the best position of its own captions.
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    own = torch.zeros_like(similarity, dtype=torch.bool)
    own[owner, torch.arange(owner.numel())] = True
    image_ranks = torch.where(own, position, torch.full_like(position, order.shape[1])).min(dim=1).values
    if (image_ranks == order.shape[1]).any():
        missing = torch.nonzero(image_ranks == order.shape[1]).flatten().tolist()[:5]
        raise ValueError(f"images {missing} have no caption")

    order_t = torch.sort(similarity.T, dim=1, descending=True, stable=True).indices  # (texts, images)
    text_ranks = (order_t == owner[:, None]).int().argmax(dim=1)
    return image_ranks.numpy(), text_ranks.numpy()


def recall_at_k(ranks: np.ndarray, ks=(1, 5, 10)) -> dict:
    """`{"R@k": fraction of ranks < k}` for each k."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@K both ways, their sum (`rsum`) and the median/mean 1-based ranks.

    Returns:
        `{"image_to_text": {"R@1": ..., ...}, "text_to_image": {...}, "rsum": ..., ...}`.
    """
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image)
    i2t, t2i = recall_at_k(image_ranks, ks), recall_at_k(text_ranks, ks)
    return {
        "image_to_text": {
            **i2t,
            "median_rank": float(np.median(image_ranks) + 1),
            "mean_rank": float(image_ranks.mean() + 1),
        },
        "text_to_image": {
            **t2i,
            "median_rank": float(np.median(text_ranks) + 1),
            "mean_rank": float(text_ranks.mean() + 1),
        },
        "rsum": 100.0 * (sum(i2t.values()) + sum(t2i.values())),
        "num_images": int(image_features.shape[0]),
        "num_texts": int(text_features.shape[0]),
    }


def evaluate_retrieval(
    extractor, data: EvalData, *, image_column: str = "image", caption_column: str = "caption", ks=(1, 5, 10)
) -> tuple[dict, torch.Tensor, np.ndarray]:
    """Retrieval on one dataset split whose caption column holds a caption or a list of captions per image.

    Args:
        extractor: a `FeatureExtractor`.
        data: the split (`load_eval_dataset`).
        image_column, caption_column: the columns.
        ks: the K of recall@K.

    Returns:
        `(metrics, similarity, text_to_image)`: the dict of `retrieval_metrics` (plus `"protocol"`), the
        `(images, texts)` cosine similarity matrix (for plots) and each caption's image index.
    """
    texts, owner = captions_per_image(data.dataset, caption_column, data.source)
    image_features = extractor.image_features(data, image_column)
    text_features = extractor.text_features(texts, f"captions of {data.describe()}")
    metrics = retrieval_metrics(image_features, text_features, owner, ks)
    similarity = (_normalise(image_features) @ _normalise(text_features).T).float()
    return {"protocol": "retrieval", **metrics}, similarity, owner
