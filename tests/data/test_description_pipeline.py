"""The description pipeline with tiny random models: columns and types, prompts, skipped steps, taggers, resuming,
and training RWKV-CLIP on the result."""

import json

import pytest
import torch
from datasets import Dataset, List, Value

from rwkv_clip_hf.data import (
    Captioner,
    ClassifierTagger,
    DescriptionMerger,
    DescriptionPipeline,
    MergePrompt,
    OutputColumns,
    ZeroShotTagger,
    clean_generation,
    clean_label,
    render_chat,
    select_tags,
)
from rwkv_clip_hf.evaluation.features import pooled
from rwkv_clip_hf.training import ContrastiveCollator, ContrastiveTransform

from tiny_models import (
    CLASSIFIER_LABELS,
    NO_SYSTEM_TEMPLATE,
    no_special_tokens,
    shapes_with_raw_text,
    tiny_captioner,
    tiny_classifier,
    tiny_llama,
    tiny_rwkv_clip,
    word_tokenizer,
)

VOCABULARY = ["circle", "square", "triangle", "red thing", "blue thing", "star"]
BLANK = (2,)  # the row without raw text


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    captioner_model, image_processor, caption_tokenizer = tiny_captioner()
    clip, clip_processor = tiny_rwkv_clip()
    tokenizer = word_tokenizer()
    return {
        "captioner": Captioner(
            captioner_model, image_processor, tokenizer=caption_tokenizer, max_new_tokens=5,
            generation_kwargs=no_special_tokens(caption_tokenizer),
        ),
        "tagger": ZeroShotTagger(clip, clip_processor, vocabulary=VOCABULARY, threshold=0.15, top_k=2),
        "no_tags": ZeroShotTagger(clip, clip_processor, vocabulary=VOCABULARY, threshold=0.999, top_k=2),
        "merger": DescriptionMerger(
            tiny_llama(tokenizer), tokenizer, max_new_tokens=4, generation_kwargs=no_special_tokens(tokenizer)
        ),
        "clip": (clip, clip_processor),
    }  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return shapes_with_raw_text(7, blank=BLANK)


def pipeline(models, tagger="tagger", **kwargs):
    options = dict(text_column="alt_text", batch_size=3, shard_size=3)
    options.update(kwargs)
    return DescriptionPipeline(models["captioner"], models[tagger] if tagger else None, models["merger"], **options)


@pytest.fixture(scope="module")
def finished(models, data, tmp_path_factory):
    """One complete run, recording the merger's conversations."""
    seen = []
    original = DescriptionMerger.conversations

    def recording(self, raw_texts, captions, tags):
        conversations = original(self, raw_texts, captions, tags)
        seen.extend(conversations)
        return conversations

    DescriptionMerger.conversations = recording
    try:
        output = tmp_path_factory.mktemp("run") / "out"
        result = pipeline(models).run(data, output)
    finally:
        DescriptionMerger.conversations = original
    return result, output, seen


def test_pipeline_writes_the_training_columns(finished, data):
    result, output, _ = finished
    assert len(result) == len(data)
    assert result.features["raw_text"] == Value("string")
    assert result.features["synthetic_caption"] == Value("string")
    assert result.features["tags"] == List(Value("string"))
    assert result.features["generated_description"] == Value("string")
    assert "alt_text" not in result.column_names  # renamed to raw_text, values unchanged
    assert result["raw_text"] == data["alt_text"]
    assert result["shape"] == data["shape"]  # other columns kept, in order
    assert all(isinstance(c, str) and c for c in result["synthetic_caption"])
    assert all(isinstance(d, str) and d for d in result["generated_description"])
    for tags in result["tags"]:
        assert 1 <= len(tags) <= 2 and set(tags) <= set(VOCABULARY)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_rows"] == len(data)
    assert manifest["config"]["pipeline"]["steps"]["merge"]["prompt"] == MergePrompt().to_dict()
    assert manifest["config"]["pipeline"]["steps"]["tags"]["threshold"] == 0.15
    assert not (output / "shards").exists()  # removed once the final dataset is written
    assert not [p for p in output.iterdir() if p.name.startswith(".tmp")]


def test_prompts_carry_each_rows_raw_text_caption_and_tags(finished):
    result, _, seen = finished
    assert len(seen) == len(result)  # every row has a caption and tags, so every row is prompted
    default = MergePrompt()
    for row, conversation in zip(result, seen):
        assert [m["role"] for m in conversation] == ["system", "user"]
        assert conversation[0]["content"] == default.system
        user = conversation[1]["content"]
        assert (
            f"Machine caption (describes what is visible, may be generic or partly wrong): {row['synthetic_caption']}"
            "\n" in user
        )
        assert f"Detected objects and concepts: {', '.join(row['tags'])}\n" in user
        if row["raw_text"]:
            assert f"may be noisy, ungrammatical or incomplete): {row['raw_text']}\n" in user
        else:
            assert default.empty_raw_text in user
    assert sum(default.empty_raw_text in c[1]["content"] for c in seen) == len(BLANK)


def test_images_without_tags_and_rows_without_inputs(models, data):
    seen = []

    class Recording(DescriptionMerger):
        def conversations(self, raw_texts, captions, tags):
            seen.extend(super().conversations(raw_texts, captions, tags))
            return seen[-len(raw_texts) :]

    tokenizer = models["merger"].tokenizer
    merger = Recording(
        models["merger"].model, tokenizer, max_new_tokens=3, generation_kwargs=no_special_tokens(tokenizer)
    )
    # Tags only, and none clears the threshold: empty lists, typed as lists of strings.
    tags_only = DescriptionPipeline(tagger=models["no_tags"], merger=merger, text_column="alt_text", batch_size=4)
    result = tags_only.process(data)
    assert result["tags"] == [[]] * len(data)
    assert result.features["tags"] == List(Value("string"))
    assert "synthetic_caption" not in result.column_names
    user = [c[-1]["content"] for c in seen]
    assert all(
        "Detected objects and concepts: none\n" in u and "Machine caption" in u and ": (none)\n" in u for u in user
    )
    # The blank row has no raw text, no caption and no tags: nothing to describe, the model is not asked.
    assert len(seen) == len(data) - len(BLANK)
    assert [d == "" for d in result["generated_description"]] == [i in BLANK for i in range(len(data))]


def test_merger_alone_uses_existing_caption_and_tags_columns(models):
    rows = Dataset.from_dict(
        {
            "raw_text": ["Eiffel Tower, Paris 1889", ""],
            "synthetic_caption": ["a tall iron tower", "a dog on grass"],
            "tags": [["tower", "sky"], []],
        }
    )
    merger = models["merger"]
    prompts = merger.conversations(rows["raw_text"], rows["synthetic_caption"], rows["tags"])
    result = DescriptionPipeline(merger=merger, batch_size=2).process(rows)
    assert result.column_names == ["raw_text", "synthetic_caption", "tags", "generated_description"]
    assert all(result["generated_description"])
    assert "Eiffel Tower, Paris 1889" in prompts[0][1]["content"] and "tower, sky" in prompts[0][1]["content"]
    assert "a dog on grass" in prompts[1][1]["content"] and "concepts: none" in prompts[1][1]["content"]


def test_captioner_alone(models, data):
    result = DescriptionPipeline(models["captioner"], text_column="alt_text", batch_size=4).process(
        data.select(range(3))
    )
    assert result.column_names == ["image", "shape", "color", "raw_text", "synthetic_caption"]
    direct = models["captioner"](data.select(range(3))["image"])
    assert result["synthetic_caption"] == direct  # batching through datasets.map changes nothing


def test_resume_after_an_interruption_redoes_no_finished_row(models, data, finished, tmp_path, monkeypatch):
    reference, _, _ = finished
    counts = {"caption": 0, "merge": 0}
    caption, merge = Captioner.__call__, DescriptionMerger.__call__
    fail_after = {"rows": 6}  # the first two shards (3 rows each) finish, the third fails

    def counting_caption(self, images):
        if counts["caption"] >= fail_after["rows"]:
            raise RuntimeError("interrupted")
        counts["caption"] += len(images)
        return caption(self, images)

    def counting_merge(self, raw_texts, captions, tags):
        counts["merge"] += len(raw_texts)
        return merge(self, raw_texts, captions, tags)

    monkeypatch.setattr(Captioner, "__call__", counting_caption)
    monkeypatch.setattr(DescriptionMerger, "__call__", counting_merge)
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        pipeline(models).run(data, output)
    assert sorted(p.name for p in (output / "shards").iterdir()) == ["00000-of-00003", "00001-of-00003"]
    assert not (output / "dataset").exists()
    assert counts == {"caption": 6, "merge": 6}
    (output / "shards" / ".tmp-00002-of-00003-999").mkdir()  # a save killed half-way

    with pytest.raises(ValueError, match="pass `resume=True`.*or `overwrite=True`"):
        pipeline(models).run(data, output)
    fail_after["rows"] = 10**9
    result = pipeline(models).run(data, output, resume=True)
    assert counts == {"caption": 7, "merge": 7}  # only the last shard's single row was processed again
    assert result.to_dict() == reference.to_dict()  # same as the uninterrupted run (greedy, same models)
    # A finished run resumes without calling any model.
    again = pipeline(models).run(data, output, resume=True)
    assert counts == {"caption": 7, "merge": 7} and len(again) == len(data)


def test_changed_configuration_or_input_is_refused(models, data, finished, tmp_path):
    output = tmp_path / "out"
    pipeline(models, shard_size=4).run(data.select(range(4)), output)
    with pytest.raises(ValueError) as error:
        pipeline(models, tagger="no_tags", shard_size=4).run(data.select(range(4)), output, resume=True)
    assert "pipeline.steps.tags.threshold: was 0.15, now 0.999" in str(error.value)
    assert "pass `overwrite=True` to start over" in str(error.value)
    with pytest.raises(ValueError, match="input.num_rows: was 4, now 5"):
        pipeline(models, shard_size=4).run(data.select(range(5)), output, resume=True)
    with pytest.raises(ValueError, match="pipeline.shard_size: was 4, now 3"):
        pipeline(models).run(data.select(range(4)), output, resume=True)
    result = pipeline(models, tagger="no_tags", shard_size=4).run(data.select(range(4)), output, overwrite=True)
    assert result["tags"] == [[]] * 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an output of this pipeline"):
        pipeline(models).run(data, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_output_trains_rwkv_clip(finished, models):
    result, _, _ = finished
    clip, processor = models["clip"]
    columns = OutputColumns().caption_columns
    transform = ContrastiveTransform(processor, image_column="image", caption_columns=columns, seed=0)
    rows = result[:4]
    chosen = transform.choose_captions(rows)
    for i, caption in enumerate(chosen):
        assert caption in [rows[c][i] for c in columns] and caption
    result.set_transform(transform)
    batch = ContrastiveCollator(processor.tokenizer)([result[i] for i in range(4)])
    model = type(clip)(clip.config)
    model.load_state_dict(clip.state_dict())
    model.train()
    before = model.logit_scale.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.logit_scale.detach(), before)


def test_classifier_tagger_threshold_and_top_k(data):
    model, image_processor = tiny_classifier()
    images = data.select(range(4))["image"]
    with torch.no_grad():
        inputs = image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        probabilities = model(**inputs).logits.softmax(-1)
    labels = [clean_label(n) for n in CLASSIFIER_LABELS]
    assert labels == ["red thing", "blue box", "green disc", "star"]
    top = probabilities[0].sort(descending=True).values
    threshold = float(top[0] + top[1]) / 2  # between row 0's best two labels
    tags = ClassifierTagger(model, image_processor, threshold=threshold, top_k=2)(images)
    for row, row_tags in zip(probabilities, tags):
        expected = [labels[i] for i in row.argsort(descending=True).tolist() if row[i] >= threshold][:2]
        assert row_tags == expected
    assert tags[0] == [labels[int(probabilities[0].argmax())]]
    tags = ClassifierTagger(model, image_processor, threshold=0.0, top_k=2)(images)
    assert tags == [[labels[i] for i in row.argsort(descending=True)[:2].tolist()] for row in probabilities]
    multi, processor = tiny_classifier(multi_label=True)
    with torch.no_grad():
        sigmoid = multi(**processor(images=[i.convert("RGB") for i in images], return_tensors="pt")).logits.sigmoid()
    tags = ClassifierTagger(multi, processor, threshold=None, top_k=3)(images)
    assert tags == [[labels[i] for i in row.argsort(descending=True)[:3].tolist()] for row in sigmoid]


def test_zero_shot_tagger_matches_clip_scores(models, data):
    clip, processor = models["clip"]
    images = [i.convert("RGB") for i in data.select(range(3))["image"]]
    with torch.no_grad():
        image = pooled(clip.get_image_features(**processor(images=images, return_tensors="pt")))
        text_inputs = processor(text=[f"a photo of {t}." for t in VOCABULARY], padding=True, return_tensors="pt")
        text = pooled(clip.get_text_features(**text_inputs))
        cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
        probabilities = (clip.logit_scale.exp() * cosine).softmax(-1)
    for score, values in (("softmax", probabilities), ("cosine", cosine)):
        threshold = float(values.median())
        tagger = ZeroShotTagger(clip, processor, vocabulary=VOCABULARY, threshold=threshold, top_k=3, score=score)
        expected = [
            [VOCABULARY[i] for i in row.argsort(descending=True).tolist() if row[i] >= threshold][:3] for row in values
        ]
        assert tagger(images) == expected


def test_select_tags_and_label_cleaning():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.05, 0.05, 0.9]])
    assert select_tags(scores, ["a", "b", "c"], threshold=0.15, top_k=None) == [["b", "c"], ["c"]]
    assert select_tags(scores, ["a", "b", "c"], threshold=None, top_k=1) == [["b"], ["c"]]
    assert select_tags(scores, ["a", "b", "c"], threshold=0.95, top_k=2) == [[], []]
    assert clean_label("tabby, tabby_cat") == "tabby" and clean_label("golden_retriever") == "golden retriever"
    with pytest.raises(ValueError, match="threshold, a top-k"):
        ClassifierTagger("unused", threshold=None, top_k=None)


def test_merger_prompt_handling(models):
    tokenizer = word_tokenizer(chat_template=None)
    merger = DescriptionMerger(models["merger"].model, tokenizer)
    with pytest.raises(ValueError, match="has no chat template.*as `chat_template`"):
        merger.load()
    # A template that rejects the system role: the system message goes into the user turn.
    folded = DescriptionMerger(
        models["merger"].model, word_tokenizer(chat_template=NO_SYSTEM_TEMPLATE), max_new_tokens=2
    )
    assert len(folded(["a red circle"], ["a circle"], [["red"]])) == 1
    text = render_chat(folded.tokenizer, folded.conversations(["x"], ["y"], [[]]), add_generation_prompt=True)[0]
    assert "<|system|>" not in text and text.startswith(f"<|user|> {MergePrompt().system}\n\n")
    assert clean_generation('  "A red  circle\n on grass."  ') == "A red circle on grass."
    assert clean_generation("") == ""


def test_merge_prompt_validation_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown placeholder \{text\}"):
        MergePrompt(template="Describe {text}")
    with pytest.raises(ValueError, match="uses none of"):
        MergePrompt(template="Describe the image")
    prompt = MergePrompt(system="", template="T={raw_text} C={caption} G={tags} {{literal}}", no_tags="-")
    assert prompt.messages("  Big   Ben ", None, ["clock", "clock", " "]) == [
        {"role": "user", "content": f"T=Big Ben C={prompt.empty_caption} G=clock {{literal}}"}
    ]
    assert prompt.user_message("", "c", []) == f"T={prompt.empty_raw_text} C=c G=- {{literal}}"
    (tmp_path / "p.json").write_text(json.dumps({"system": "S", "template": "{caption}"}))
    assert MergePrompt.from_file(tmp_path / "p.json") == MergePrompt(system="S", template="{caption}")
    (tmp_path / "p.txt").write_text("Caption: {caption}\n")
    assert MergePrompt.from_file(tmp_path / "p.txt").template == "Caption: {caption}"
    (tmp_path / "bad.json").write_text(json.dumps({"sytem": "S"}))
    with pytest.raises(ValueError, match="unknown: \\['sytem'\\]"):
        MergePrompt.from_file(tmp_path / "bad.json")


def test_device_and_dtype_options(data):
    from rwkv_clip_hf.data.stage import default_device, torch_dtype

    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_dtype("auto", "cpu") is torch.float32 and torch_dtype("auto", "cuda") == "auto"
    assert torch_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="`dtype` 'half'"):
        torch_dtype("half", "cpu")
    model, image_processor, tokenizer = tiny_captioner()
    captioner = Captioner(
        model, image_processor, tokenizer=tokenizer, max_new_tokens=3, device="cpu", dtype="bfloat16",
        generation_kwargs=no_special_tokens(tokenizer),
    )  # fmt: skip
    captions = captioner(data.select(range(2))["image"])  # pixel values follow the model's dtype
    assert captioner.model.dtype == torch.bfloat16 and len(captions) == 2 and all(captions)
    assert captioner.config()["dtype"] == "bfloat16"
