"""Instruction data for the merger: same prompts as generation, labels only on the answer, and the LoRA example."""

import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from rwkv_clip_hf.data import (
    IGNORE_INDEX,
    DescriptionMerger,
    MergePrompt,
    build_instruction_dataset,
    tokenize_conversation,
    tokenize_instruction_dataset,
)

from tiny_models import tiny_llama, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "raw_text": ["red circle by Ann, 2019", "", "blue square"],
    "synthetic_caption": ["a red circle", "a green star on white", None],
    "tags": [["red", "circle"], [], ["square"]],
    "generated_description": ["A red circle drawn by Ann in 2019.", "A green star on a white background.", "  "],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_instruction_rows_use_the_merger_prompt():
    rows = Dataset.from_dict(ROWS)
    prompt = MergePrompt(system="Be exact.")
    instructions = build_instruction_dataset(rows, prompt=prompt)
    assert instructions.column_names == ["messages"]
    assert len(instructions) == 2  # the blank target is dropped
    tokenizer = word_tokenizer()
    merger = DescriptionMerger(tiny_llama(tokenizer), tokenizer, prompt=prompt)
    expected = merger.conversations(ROWS["raw_text"][:2], ROWS["synthetic_caption"][:2], ROWS["tags"][:2])
    for messages, asked, target in zip(instructions["messages"], expected, ROWS["generated_description"]):
        assert messages[:-1] == asked
        assert messages[-1] == {"role": "assistant", "content": target}
    assert (
        "red circle by Ann, 2019" in expected[0][1]["content"] and prompt.empty_raw_text in expected[1][1]["content"]
    )
    kept = build_instruction_dataset(rows, prompt=prompt, keep_columns=True, caption_column=None)
    assert kept.column_names == [*ROWS, "messages"]
    assert prompt.empty_caption in kept[0]["messages"][1]["content"]  # no caption column: the prompt says so
    with pytest.raises(ValueError, match="target column 'description'.*columns are"):
        build_instruction_dataset(rows, target_column="description")


def test_labels_cover_only_the_answer_and_the_prompt_is_the_generation_prompt():
    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer)
    merger = DescriptionMerger(model, tokenizer, max_new_tokens=2)
    messages = build_instruction_dataset(Dataset.from_dict(ROWS))[0]["messages"]
    encoded = tokenize_conversation(messages, tokenizer)

    seen = {}
    generate = model.generate

    def recording(**kwargs):
        seen["input_ids"] = kwargs["input_ids"][0].tolist()
        return generate(**kwargs)

    model.generate = recording
    merger(ROWS["raw_text"][:1], ROWS["synthetic_caption"][:1], ROWS["tags"][:1])
    prompt_length = len(seen["input_ids"])
    assert encoded["input_ids"][:prompt_length] == seen["input_ids"]  # trained on exactly what generation sees
    assert encoded["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    answer = tokenizer("A red circle drawn by Ann in 2019.", add_special_tokens=False)["input_ids"]
    end, eos = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    assert encoded["labels"][prompt_length:] == answer + [end, eos]  # the answer, the end of turn, EOS
    assert encoded["input_ids"][prompt_length:] == answer + [end, eos]
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])

    short = tokenize_conversation(messages, tokenizer, max_length=prompt_length + 2)
    assert short["labels"] == [IGNORE_INDEX] * prompt_length + answer[:2]
    dataset = build_instruction_dataset(Dataset.from_dict(ROWS))
    assert len(tokenize_instruction_dataset(dataset, tokenizer, max_length=None)) == 2
    assert len(tokenize_instruction_dataset(dataset, tokenizer, max_length=prompt_length - 3)) == 0

    tokenizer.chat_template = tokenizer.chat_template.replace(
        "<|assistant|> {% endif %}", "<|assistant|>: {% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix"):
        tokenize_conversation(messages, tokenizer)


def test_finetune_merger_example_runs_tiny(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("finetune_merger", ROOT / "examples" / "finetune_merger.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    written = example.main(
        ["--tiny", "--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--learning_rate", "5e-2", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true", "--merge"]
    )  # fmt: skip
    assert torch.isfinite(torch.tensor(written["train_loss"]))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert MergePrompt.from_file(tmp_path / "merger_prompt.json") == MergePrompt()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-base").eval()
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(written["merged"]).eval()(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)  # merging keeps the outputs


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dataset", "./no-such-dir"], "--dataset ./no-such-dir"),
        (["--tiny", "--prompt_file", "missing.json"], "--prompt_file: prompt file missing.json: no such file"),
        (["--tiny", "--target_column", "nope"], "target column 'nope'"),
    ],
)
def test_finetune_merger_names_the_bad_argument(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("finetune_merger", ROOT / "examples" / "finetune_merger.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit, match="error: ") as raised:
        example.main([*arguments, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert message in str(raised.value)
