"""Loading evaluation data from the layouts `datasets` reads, with errors that name what is wrong."""

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from rwkv_clip_hf.evaluation import load_eval_dataset
from rwkv_clip_hf.evaluation.data import class_names_from_features, labels_as_ints, to_pil

from eval_stubs import id_image, save_classification_dataset


def red_values(data):
    return [int(np.asarray(to_pil(v))[0, 0, 0]) for v in data.dataset["image"]]


def test_save_to_disk_splits_and_errors(tmp_path):
    path = save_classification_dataset(tmp_path / "d", [0, 1, 0, 1], ["a", "b"], split="validation")
    data = load_eval_dataset(path, "validation")
    assert len(data) == 4 and data.source["split"] == "validation" and red_values(data) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"no split 'test'; available splits: \['validation'\]"):
        load_eval_dataset(path, "test")
    assert len(load_eval_dataset(path, None)) == 4  # a single split needs no name


def test_single_dataset_without_splits(tmp_path):
    Dataset.from_dict({"image": [id_image(7)], "label": [0]}).save_to_disk(str(tmp_path / "one"))
    data = load_eval_dataset(str(tmp_path / "one"), "test")
    assert data.source["split"] is None and red_values(data) == [7]


def test_imagefolder(tmp_path):
    for name, ids in (("cat", [3, 4]), ("dog", [5])):
        folder = tmp_path / "pets" / "test" / name
        folder.mkdir(parents=True)
        for i in ids:
            id_image(i).save(folder / f"{i}.png")
    data = load_eval_dataset(str(tmp_path / "pets"), "test", cache_dir=str(tmp_path / "hf"))
    assert sorted(red_values(data)) == [3, 4, 5]
    assert class_names_from_features(data.dataset, "label") == ["cat", "dog"]
    labels = labels_as_ints(data.dataset, "label")
    assert sorted(zip(red_values(data), labels.tolist())) == [(3, 0), (4, 0), (5, 1)]


def test_parquet_file_with_image_paths_and_filter(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        id_image(10 + i).save(paths[-1])
    Dataset.from_dict(
        {"file": paths, "caption": [["x", "y"]] * 4, "part": ["test", "train", "test", "val"]}
    ).to_parquet(str(tmp_path / "data.parquet"))
    data = load_eval_dataset(
        str(tmp_path / "data.parquet"), "test", filters=["part=test"], cache_dir=str(tmp_path / "hf")
    )
    assert [int(np.asarray(to_pil(v))[0, 0, 0]) for v in data.dataset["file"]] == [10, 12]
    with pytest.raises(
        ValueError, match=r"`filters` entry 'split=test': no such column 'split'.*\['file', 'caption', 'part'\]"
    ):
        load_eval_dataset(str(tmp_path / "data.parquet"), None, filters=["split=test"], cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no row"):
        load_eval_dataset(str(tmp_path / "data.parquet"), None, filters=["part=dev"], cache_dir=str(tmp_path / "hf"))


def test_max_samples_is_a_seeded_subset_in_order(tmp_path):
    path = save_classification_dataset(tmp_path / "d", [0] * 10 + [1] * 10, ["a", "b"])
    first = red_values(load_eval_dataset(path, "test", max_samples=6))
    assert first == sorted(first) and len(first) == 6 and len(set(first)) == 6
    assert first == red_values(load_eval_dataset(path, "test", max_samples=6))
    assert first != red_values(load_eval_dataset(path, "test", max_samples=6, seed=1))
    assert first != list(range(6))  # not simply the head (which would hold one class)


def test_missing_path_and_bad_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_eval_dataset(str(tmp_path / "no-such-dir"), "test")
    with pytest.raises(ValueError, match=r"`label_column` 'label' must hold integer class ids"):
        labels_as_ints(Dataset.from_dict({"label": ["cat", "dog"]}), "label")
    with pytest.raises(ValueError, match="negative"):
        labels_as_ints(Dataset.from_dict({"label": [0, -1]}), "label")
    with pytest.raises(TypeError, match="column 'img'"):
        to_pil(3.0, "img")


def test_hub_style_dataset_dict_needs_a_split(tmp_path):
    DatasetDict({"train": Dataset.from_dict({"a": [1]}), "test": Dataset.from_dict({"a": [2]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with `split`"):
        load_eval_dataset(str(tmp_path / "dd"), None)
