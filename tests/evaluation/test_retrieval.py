"""Retrieval recall@K with several captions per image, on features whose ranks are worked out by hand."""

import pytest
import torch

from rwkv_clip_hf.evaluation import (
    FeatureCache,
    FeatureExtractor,
    evaluate_retrieval,
    load_eval_dataset,
    retrieval_metrics,
)
from rwkv_clip_hf.evaluation.retrieval import retrieval_ranks

from eval_stubs import StubModel, StubProcessor, save_caption_dataset

# Caption j as a unit vector over the 4 one-hot images: its cosine with image i is component i.
CAPTIONS = {
    "t0": (0.6, 0.8, 0.0, 0.0),
    "t1": (0.48, 0.64, 0.6, 0.0),
    "t2": (0.0, 0.28, 0.96, 0.0),
    "t3": (0.64, 0.48, 0.0, 0.6),
    "t4": (0.0, 0.6, 0.48, 0.64),
    "t5": (0.0, 0.96, 0.28, 0.0),
    "t6": (0.28, 0.0, 0.0, 0.96),
}
CAPTIONS_PER_IMAGE = [["t0", "t1"], ["t2", "t3", "t4"], ["t5"], ["t6"]]
OWNER = [0, 0, 1, 1, 1, 2, 3]
# Image -> text, each image's row of cosines sorted (own captions starred):
#   image 0: t3 .64, t0* .60, t1* .48, t6 .28, ...          -> best own at rank 1
#   image 1: t5 .96, t0 .80, t1 .64, t4* .60, t3* .48, ...  -> rank 3
#   image 2: t2 .96, t1 .60, t4 .48, t5* .28, ...           -> rank 3
#   image 3: t6* .96, t4 .64, t3 .60, ...                   -> rank 0
IMAGE_RANKS = [1, 3, 3, 0]
# Text -> image, each caption's cosines over the 4 images sorted (own image starred):
#   t0: i1 .8, i0* .6 -> 1;  t1: i1 .64, i2 .6, i0* .48 -> 2;  t2: i2 .96, i1* .28 -> 1;
#   t3: i0 .64, i3 .6, i1* .48 -> 2;  t4: i3 .64, i1* .6 -> 1;  t5: i1 .96, i2* .28 -> 1;  t6: i3* .96 -> 0
TEXT_RANKS = [1, 2, 1, 2, 1, 1, 0]


def features():
    # Different norms per image and per caption: only the cosine may matter.
    images = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.5]))
    texts = torch.tensor(list(CAPTIONS.values())) * torch.arange(1, 8, dtype=torch.float32)[:, None]
    return images, texts


def test_ranks_by_hand():
    images, texts = features()
    image_ranks, text_ranks = retrieval_ranks(images, texts, OWNER)
    assert image_ranks.tolist() == IMAGE_RANKS
    assert text_ranks.tolist() == TEXT_RANKS


def test_recalls_by_hand():
    images, texts = features()
    metrics = retrieval_metrics(images, texts, OWNER, ks=(1, 2, 3, 4, 5, 10))
    i2t, t2i = metrics["image_to_text"], metrics["text_to_image"]
    assert [i2t[f"R@{k}"] for k in (1, 2, 3, 4, 5, 10)] == [0.25, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert [t2i[f"R@{k}"] for k in (1, 2, 3, 4, 5, 10)] == pytest.approx([1 / 7, 5 / 7, 1.0, 1.0, 1.0, 1.0])
    assert i2t["median_rank"] == 3.0 and i2t["mean_rank"] == pytest.approx(1 + 7 / 4)
    assert t2i["median_rank"] == 2.0 and t2i["mean_rank"] == pytest.approx(1 + 8 / 7)
    assert metrics["num_images"] == 4 and metrics["num_texts"] == 7


def test_ties_do_not_favour_the_correct_item():
    # Both captions score the same against the image; the wrong one comes first in index order.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    image_ranks, _ = retrieval_ranks(images, texts, [1, 0])
    assert image_ranks.tolist() == [1, 0]


def test_owner_must_cover_every_image():
    images, texts = features()
    with pytest.raises(ValueError, match=r"images \[3\] have no caption"):
        retrieval_ranks(images, texts, [0, 0, 1, 1, 1, 2, 2])


def test_retrieval_through_the_dataset(tmp_path):
    path = save_caption_dataset(tmp_path / "captions", CAPTIONS_PER_IMAGE)
    images, texts = features()
    vocab = {name: i for i, name in enumerate(CAPTIONS)}
    model = StubModel(images, texts)
    extractor = FeatureExtractor(
        model, StubProcessor(vocab), {"stub": "retrieval"}, FeatureCache(tmp_path / "cache"), batch_size=3
    )
    metrics, similarity, owner = evaluate_retrieval(extractor, load_eval_dataset(path, "test"))
    assert owner.tolist() == OWNER
    assert metrics["image_to_text"]["R@1"] == 0.25 and metrics["image_to_text"]["R@5"] == 1.0
    assert metrics["text_to_image"]["R@1"] == pytest.approx(1 / 7) and metrics["text_to_image"]["R@5"] == 1.0
    assert metrics["rsum"] == pytest.approx(100 * (0.25 + 1 + 1 + 1 / 7 + 1 + 1))
    torch.testing.assert_close(similarity, torch.tensor(list(CAPTIONS.values())).T, rtol=0, atol=1e-6)


def test_single_caption_column_and_bad_rows(tmp_path):
    from datasets import Dataset

    from rwkv_clip_hf.evaluation.data import captions_per_image

    texts, owner = captions_per_image(Dataset.from_dict({"caption": ["a", "b"]}), "caption")
    assert texts == ["a", "b"] and owner.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"`caption_column` 'caption': row 1"):
        captions_per_image(Dataset.from_dict({"caption": [["a"], []]}), "caption")
    with pytest.raises(ValueError, match=r"`caption_column` 'text': no such column"):
        captions_per_image(Dataset.from_dict({"caption": ["a"]}), "text")
