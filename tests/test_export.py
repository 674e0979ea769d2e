"""torch.export, torch.compile(fullgraph=True) and ONNX export of the towers and the dual encoder.

On the PyTorch Bi-WKV path (backend "torch"); torch.export also on the prebuilt CPU kernel, a `torch.ops` custom
op with a fake implementation, which stays one node of the graph (ONNX has no translation for it). The exports
and compilations take seconds to minutes each on a CPU: they are marked slow (`make test-export`).
"""

import random

import pytest
import torch

from rwkv_clip_hf import RWKVCLIPModel
from rwkv_clip_hf.modeling_rwkv_clip import canonical_text_ids

from conftest import BOS, EOS, VOCAB, randomize_, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return randomize_(RWKVCLIPModel(tiny_config()).set_kernel_backend("torch").eval(), seed=7)


def text_batch(batch: int, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of random lengths, padded on random sides with random junk ids."""
    rng = random.Random(seed)
    ids, mask = [], []
    for _ in range(batch):
        n = rng.randint(2, length)
        caption = [BOS] + [rng.randrange(1, VOCAB - 2) for _ in range(n - 2)] + [EOS]
        pad = [rng.randrange(VOCAB) for _ in range(length - n)]
        left = rng.random() < 0.5
        ids.append(pad + caption if left else caption + pad)
        mask.append([0] * (length - n) + [1] * n if left else [1] * n + [0] * (length - n))
    return torch.tensor(ids), torch.tensor(mask)


def reference_canonical_ids(ids, mask, context, pad, eos):
    """The original layout, by plain Python lists."""
    rows = []
    for row, keep in zip(ids.tolist(), mask.tolist()):
        real = [token for token, k in zip(row, keep) if k]
        if len(real) > context:
            real = real[:context]
            real[-1] = eos
        rows.append(real + [pad] * (context - len(real)))
    return torch.tensor(rows)


@pytest.mark.parametrize("length", [5, 12, 20])
def test_canonical_text_ids_equal_the_list_reference(length):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, VOCAB, (64, length), generator=generator)
    mask = torch.rand(64, length, generator=generator) < 0.6  # any pattern: holes in the middle too
    mask[0] = True
    mask[1] = False
    got = canonical_text_ids(ids, mask.long(), 12, 0, EOS)
    assert torch.equal(got, reference_canonical_ids(ids, mask.long(), 12, 0, EOS))


def check_exported(exported, module, inputs: dict, atol: float = 1e-6) -> None:
    with torch.no_grad():
        got, expected = exported.module()(**inputs), module(**inputs)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol)


@pytest.mark.slow
def test_export_text_tower_with_dynamic_batch(model):
    tower = model.text_model
    batch = torch.export.Dim("batch", min=1, max=64)
    ids, mask = text_batch(2)
    exported = torch.export.export(
        tower,
        (),
        {"input_ids": ids, "attention_mask": mask},
        dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
    )
    ids, mask = text_batch(5, seed=1)
    check_exported(exported, tower, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.slow
@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["native", "non-native"])
def test_export_vision_tower_with_dynamic_batch(model, size):
    tower = model.vision_model
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(
        tower, (), {"pixel_values": torch.randn(2, 3, *size)}, dynamic_shapes={"pixel_values": {0: batch}}
    )
    check_exported(exported, tower, {"pixel_values": torch.randn(3, 3, *size)})


@pytest.mark.slow
def test_export_dual_encoder_with_dynamic_batches(model):
    texts, images = torch.export.Dim("texts", min=1, max=64), torch.export.Dim("images", min=1, max=64)
    ids, mask = text_batch(2)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 32, 32)}
    exported = torch.export.export(
        model,
        (),
        inputs,
        dynamic_shapes={"input_ids": {0: texts}, "attention_mask": {0: texts}, "pixel_values": {0: images}},
    )
    ids, mask = text_batch(4, seed=2)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        got, expected = exported.module()(**inputs), model(**inputs)
    torch.testing.assert_close(got["logits_per_image"], expected.logits_per_image, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_dual_encoder(model):
    compiled = torch.compile(model, fullgraph=True)
    ids, mask = text_batch(3, seed=3)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 40, 32)}
    with torch.no_grad():
        got, expected = compiled(**inputs), model(**inputs)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_captures_both_towers_in_one_graph(model):
    # dynamo's capture alone (no code generation, seconds): fullgraph=True raises on any graph break
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = text_batch(3, seed=4)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        got, expected = compiled(**inputs), model(**inputs)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, rtol=0, atol=1e-6)


def test_compile_fullgraph_under_bf16_autocast(model):
    # the token mix turns autocast off around its low-rank products: one graph, the eager values
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = text_batch(2, seed=5)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = compiled(**inputs), model(**inputs)
        assert torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, rtol=0, atol=1e-6)


def onnx_check(tower, inputs: dict, new_inputs: dict, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    program = torch.onnx.export(
        tower,
        (),
        kwargs=inputs,
        dynamo=True,
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_shapes={name: {0: "batch"} for name in inputs},
    )
    program.save(str(tmp_path / "tower.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "tower.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(new_inputs)
    outputs = session.run(None, {name: value.numpy() for name, value in new_inputs.items()})
    with torch.no_grad():
        expected = tower(**new_inputs)
    for name, got in zip(("last_hidden_state", "pooler_output"), outputs):
        want = expected[name]
        assert got.shape == tuple(want.shape)
        assert (torch.from_numpy(got) - want).abs().max() <= 1e-4 * want.abs().max(), name


@pytest.mark.slow
def test_onnx_export_vision_tower(model, tmp_path):
    onnx_check(
        model.vision_model,
        {"pixel_values": torch.randn(2, 3, 32, 32)},
        {"pixel_values": torch.randn(3, 3, 32, 32)},
        tmp_path,
    )


@pytest.mark.slow
def test_onnx_export_text_tower(model, tmp_path):
    ids, mask = text_batch(2)
    new_ids, new_mask = text_batch(5, seed=5)
    onnx_check(
        model.text_model,
        {"input_ids": ids, "attention_mask": mask},
        {"input_ids": new_ids, "attention_mask": new_mask},
        tmp_path,
    )


@pytest.fixture
def kernel_model(monkeypatch):
    """The model on the prebuilt CPU kernel (a `torch.ops` custom op with a fake implementation), or skip (fail
    under RWKV_CLIP_REQUIRE_KERNEL=1, as `make test` sets)."""
    import os
    from pathlib import Path

    from rwkv_clip_hf.ops.bi_wkv import KernelUnavailableError, kernel

    cuda_dir = Path(__file__).resolve().parents[1] / "cuda"
    monkeypatch.setenv("LOCAL_KERNELS", f"{kernel.DEFAULT_KERNEL_REPO}={cuda_dir}")
    kernel.clear_cache()
    try:
        kernel.load_kernel("cpu")
    except KernelUnavailableError as error:
        if os.environ.get("RWKV_CLIP_REQUIRE_KERNEL") == "1":
            pytest.fail(str(error))
        pytest.skip(str(error))
    yield randomize_(RWKVCLIPModel(tiny_config()).set_kernel_backend("kernel").eval(), seed=7)
    kernel.clear_cache()


@pytest.mark.slow
def test_export_towers_on_the_kernel(kernel_model):
    batch = torch.export.Dim("batch", min=1, max=64)
    vision = kernel_model.vision_model
    exported = torch.export.export(
        vision, (), {"pixel_values": torch.randn(2, 3, 40, 56)}, dynamic_shapes={"pixel_values": {0: batch}}
    )
    assert any("bi_wkv" in str(node.target) for node in exported.graph.nodes)  # the custom op, not the chunks
    # the fused element-wise block ops are traced as their PyTorch composition (ops/block.py): the same values up
    # to float32 rounding, where eager mode runs the fused kernel
    check_exported(exported, vision, {"pixel_values": torch.randn(3, 3, 40, 56)}, atol=1e-5)
    text = kernel_model.text_model
    ids, mask = text_batch(2)
    exported = torch.export.export(
        text,
        (),
        {"input_ids": ids, "attention_mask": mask},
        dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
    )
    ids, mask = text_batch(4, seed=6)
    check_exported(exported, text, {"input_ids": ids, "attention_mask": mask}, atol=1e-5)
