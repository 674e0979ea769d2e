"""RWKV-CLIP towers and model against the independent float64 reference in tests/reference.py."""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from rwkv_clip_hf import (
    RWKVCLIPConfig,
    RWKVCLIPModel,
    RWKVCLIPTextModel,
    RWKVCLIPVisionModel,
)

from conftest import BOS, EOS, VOCAB, randomize_, run_without_the_package, tiny_config, use_torch_bi_wkv
from reference import original_ids, text_tower, vision_tower


def random_captions(lengths, seed=0):
    """Caption ids as the original tokenizer makes them: [start] + tokens + [end]."""
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(1, BOS, (n,), generator=g).tolist() + [EOS] for n in lengths]


def pad_batch(captions, length, pad_id, side="right"):
    ids = torch.full((len(captions), length), pad_id)
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions):
        caption = caption[:length]
        if side == "right":
            ids[row, : len(caption)] = torch.tensor(caption)
            mask[row, : len(caption)] = 1
        else:
            ids[row, length - len(caption) :] = torch.tensor(caption)
            mask[row, length - len(caption) :] = 1
    return ids, mask


@pytest.fixture
def model(config):
    return randomize_(RWKVCLIPModel(config)).eval()


# ---------------------------------------------------------------- towers against the reference


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (45, 37), (8, 8)])
def test_vision_tower_matches_reference(model, size):
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    state = model.vision_model.state_dict()
    tokens, pooled = vision_tower(pixel_values, state, model.config.vision_config)

    out64 = model.vision_model.double()(pixel_values.double())
    assert out64.pooler_output.dtype == torch.float64
    for row in range(2):
        torch.testing.assert_close(out64.last_hidden_state[row], tokens[row], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out64.pooler_output, pooled, rtol=1e-10, atol=1e-10)

    out32 = model.vision_model.float()(pixel_values)
    error = (out32.pooler_output.double() - pooled).abs().max() / pooled.abs().max()
    assert error <= 1e-5


def test_text_tower_matches_reference(model):
    config = model.config.text_config
    captions = random_captions([3, 10, 0, 20], seed=2)  # the last one is longer than the context
    canonical = torch.tensor([original_ids(c, config.max_position_embeddings, EOS) for c in captions])
    state = model.text_model.state_dict()
    tokens, pooled = text_tower(canonical, state, config)

    ids, mask = pad_batch(captions, 22, pad_id=7)
    out64 = model.text_model.double()(ids, attention_mask=mask)
    # right padding: the input positions are the original layout's, up to the context; beyond it zeros
    context = config.max_position_embeddings
    assert out64.last_hidden_state.shape == (4, 22, config.hidden_size)
    for row in range(4):
        torch.testing.assert_close(out64.last_hidden_state[row, :context], tokens[row], rtol=1e-10, atol=1e-10)
    assert not out64.last_hidden_state[:, context:].any()
    torch.testing.assert_close(out64.pooler_output, pooled, rtol=1e-10, atol=1e-10)

    out32 = model.text_model.float()(ids, attention_mask=mask)
    assert (out32.pooler_output.double() - pooled).abs().max() / pooled.abs().max() <= 1e-5


def test_towers_in_float64_stay_float64(model):
    model = model.double()
    for param in model.parameters():
        assert param.dtype == torch.float64
    out = model(input_ids=torch.tensor([[BOS, 5, EOS]]), pixel_values=torch.randn(1, 3, 32, 32).double())
    assert out.logits_per_image.dtype == torch.float64
    assert out.vision_model_output.last_hidden_state.dtype == torch.float64


# ---------------------------------------------------------------- text padding invariance


def test_text_embedding_does_not_depend_on_padding(model):
    config = model.config.text_config
    captions = random_captions([1, 4, 9], seed=3)
    alone = torch.cat([model.get_text_features(torch.tensor([c])).pooler_output for c in captions])

    longest = max(len(c) for c in captions)
    for pad_id, side in [(0, "right"), (EOS, "right"), (42, "right"), (0, "left"), (EOS, "left")]:
        ids, mask = pad_batch(captions, longest, pad_id, side)
        batched = model.get_text_features(ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)

    ids_77, _ = pad_batch(captions, config.max_position_embeddings, 0)
    torch.testing.assert_close(model.get_text_features(ids_77).pooler_output, alone, rtol=0, atol=1e-6)
    # no mask but padded past the end-of-text id, longer than the context: the padding is ignored
    ids_long, _ = pad_batch(captions, config.max_position_embeddings + 5, 0)
    torch.testing.assert_close(model.get_text_features(ids_long).pooler_output, alone, rtol=0, atol=1e-6)


def test_text_longer_than_context_is_truncated_like_the_original(model):
    context = model.config.text_config.max_position_embeddings
    caption = random_captions([context + 8], seed=4)[0]
    expected = torch.tensor([original_ids(caption, context, EOS)])
    assert expected[0, -1] == EOS and len(caption) > context
    got = model.get_text_features(torch.tensor([caption])).pooler_output
    torch.testing.assert_close(got, model.get_text_features(expected).pooler_output, rtol=0, atol=0)
    # the same with a mask and extra padding
    ids, mask = pad_batch([caption], len(caption) + 3, 0)
    torch.testing.assert_close(model.get_text_features(ids, mask).pooler_output, got, rtol=0, atol=0)


def test_text_input_errors(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.get_text_features(torch.tensor([[BOS, VOCAB + 3, EOS]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.get_text_features(torch.tensor([[BOS, 5, EOS]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model.get_text_features(None)


# ---------------------------------------------------------------- resolution


def test_native_resolution_uses_the_position_embedding_unchanged(model):
    emb = model.vision_model.embeddings
    assert emb.interpolate_pos_encoding(4, 4) is emb.position_embedding


def test_interpolate_pos_encoding_false_raises_with_instructions(model):
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=False)
    # at the native size False is fine, and None / True interpolate elsewhere
    model.get_image_features(torch.randn(1, 3, 32, 32), interpolate_pos_encoding=False)
    a = model.get_image_features(torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))).pooler_output
    b = model.get_image_features(
        torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)), interpolate_pos_encoding=True
    ).pooler_output
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_pixel_values(model):
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.get_image_features(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.get_image_features(torch.randn(3, 32, 32))


# ---------------------------------------------------------------- the dual encoder


def test_logits_and_loss(model):
    ids, mask = pad_batch(random_captions([2, 5, 3], seed=5), 8, 0)
    pixel_values = torch.randn(3, 3, 32, 32)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
    image = model.get_image_features(pixel_values).pooler_output.double()
    text = model.get_text_features(ids, mask).pooler_output.double()
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    logits = math.exp(model.logit_scale.item()) * image @ text.t()
    torch.testing.assert_close(out.logits_per_image.double(), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    # symmetric cross-entropy with the matching pairs on the diagonal, written out
    log_p_image = logits.log_softmax(dim=1).diagonal()
    log_p_text = logits.t().log_softmax(dim=1).diagonal()
    expected = -(log_p_image.mean() + log_p_text.mean()) / 2
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.to_tuple()[0] is out.loss
    assert model(input_ids=ids, pixel_values=pixel_values).loss is None


def test_output_hidden_states(model):
    out = model(
        input_ids=torch.tensor([[BOS, 4, EOS]]), pixel_values=torch.randn(1, 3, 32, 32), output_hidden_states=True
    )
    vision, text = out.vision_model_output, out.text_model_output
    assert len(vision.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert len(text.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert vision.hidden_states[0].shape == (1, 16, 32)


def test_bf16_autocast_forward(model):
    """Under bf16 autocast the GEMMs run in bf16 while Bi-WKV and the norms stay float32: the embeddings stay
    close to the float32 ones (cosine >= 0.99 on random weights, whose activations are larger than trained ones)."""
    ids = torch.tensor([[BOS, 4, 9, 17, EOS], [BOS, 5, 6, EOS, 0]])
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixel_values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, pixel_values=pixel_values)
    for name in ("image_embeds", "text_embeds"):
        got, expected = getattr(out, name).float(), getattr(reference, name)
        assert got.shape == expected.shape
        cosine = F.cosine_similarity(got, expected, dim=-1)
        assert (cosine >= 0.99).all(), (name, cosine)
        assert not torch.equal(got, expected), name  # bf16 really ran


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_bf16_autocast_precision_of_each_part(model, monkeypatch, grad):
    """Under bf16 autocast: the r / k / v / g / output projections run in bf16; Bi-WKV and the GroupNorm-times-gate
    get float32 inputs; the low-rank products with their biases (time_maa_w2, time_decay_w2) run in float32 with
    autocast off only around them (it is back on for the next projection and after the forward)."""
    from torch.overrides import TorchFunctionMode

    import rwkv_clip_hf.modeling_rwkv_clip as modeling

    config = model.config
    low_ranks = {config.vision_config.mix_lora_rank, config.vision_config.decay_lora_rank}
    low_ranks |= {config.text_config.mix_lora_rank, config.text_config.decay_lora_rank}
    seen = {"bi_wkv": set(), "group_norm_gate": set(), "low_rank": set(), "projection": set()}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            seen[name] |= {t.dtype for t in args if isinstance(t, torch.Tensor)}
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(modeling, "bi_wkv", spy("bi_wkv", modeling.bi_wkv))
    monkeypatch.setattr(modeling, "group_norm_gate", spy("group_norm_gate", modeling.group_norm_gate))

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.addmm and args[1].shape[-1] in low_ranks:
                seen["low_rank"].add((out.dtype, torch.is_autocast_enabled("cpu")))
            if func is F.linear:
                seen["projection"].add(out.dtype)
            return out

    ids = torch.tensor([[BOS, 4, 9, 17, EOS]])
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16), Record():
        out = model(input_ids=ids, pixel_values=pixel_values)
        assert torch.is_autocast_enabled("cpu")
    if grad:
        out.logits_per_image.sum().backward()
    assert seen["bi_wkv"] == {torch.float32}
    assert seen["group_norm_gate"] == {torch.float32}
    assert seen["low_rank"] == {(torch.float32, False)}
    assert seen["projection"] == {torch.bfloat16}


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_inference_path_gives_the_autograd_values(model, autocast, chunk_rows):
    """Without autograd the blocks overwrite their temporaries in place: bitwise the values of the autograd path,
    also under autocast. Long channel-mix inputs run in chunks of rows, where only the GEMM library's blocking may
    round differently."""
    if chunk_rows:
        for layer in model.vision_model.encoder.layers:
            layer.channel_mix.max_chunk_rows = chunk_rows  # 16 patches x 2 images: 5 chunks
    ids = torch.tensor([[BOS, 4, 9, 17, EOS], [BOS, 5, 6, EOS, 0]])
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, pixel_values=pixel_values)
        outputs.append((out.image_embeds.detach().float(), out.text_embeds.detach().float()))
    for with_grad, without in zip(*outputs):
        if chunk_rows is None:
            assert torch.equal(with_grad, without)
        else:  # bf16 GEMM outputs round to 2^-8
            scale = 2e-2 if autocast else 1e-6
            assert (with_grad - without).abs().max() <= scale * with_grad.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    model = randomize_(RWKVCLIPModel(config)).train()
    ids, mask = pad_batch(random_captions([2, 5], seed=6), 8, 0)
    pixel_values = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_drop_path_only_in_training():
    config = tiny_config(vision_config={"drop_path_rate": 0.5})
    model = randomize_(RWKVCLIPModel(config))
    rates = [layer.drop_path_rate for layer in model.vision_model.encoder.layers]
    assert rates == [0.0, 0.5]
    pixel_values = torch.randn(8, 3, 32, 32)
    model.eval()
    a = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(model.get_image_features(pixel_values).pooler_output, a, rtol=0, atol=0)
    model.train()
    outs = [model.get_image_features(pixel_values).pooler_output for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_training_from_scratch_lowers_the_loss(config):
    torch.manual_seed(0)
    model = RWKVCLIPModel(config).train()
    ids, mask = pad_batch(random_captions([3, 4, 5, 6], seed=7), 8, 0)
    pixel_values = torch.randn(4, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- initialisation


def test_fresh_init_follows_the_rwkv6_schedules(config):
    model = RWKVCLIPModel(config)
    layers = model.vision_model.encoder.layers
    first, last = layers[0].token_mix, layers[-1].token_mix
    dim = config.vision_config.hidden_size
    assert first.time_decay[0].item() == pytest.approx(-6.0) and first.time_decay[-1].item() == pytest.approx(-1.0)
    assert not torch.equal(first.time_decay, last.time_decay)  # layer-dependent
    assert first.time_maa_x[0].item() == pytest.approx(1.0) and last.time_maa_x.mean() < first.time_maa_x.mean()
    assert first.time_maa_w1.abs().max() <= 1e-4 and first.time_maa_w1.abs().max() > 0
    for layer in layers:
        assert not layer.token_mix.output.weight.any() and not layer.channel_mix.value.weight.any()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert first.time_faaaa.shape == (dim // config.vision_config.head_size, config.vision_config.head_size)


# ---------------------------------------------------------------- saving, loading, Auto classes


def test_save_load_round_trip(tmp_path, model):
    from safetensors.torch import load_file

    inputs = {"input_ids": torch.tensor([[BOS, 4, 9, EOS]]), "pixel_values": torch.randn(2, 3, 32, 32)}
    expected = model(**inputs).logits_per_image
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    loaded = RWKVCLIPModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits_per_image, expected, rtol=0, atol=0)


def test_auto_classes(tmp_path, model):
    from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

    model.save_pretrained(tmp_path / "full")
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.text_model.save_pretrained(tmp_path / "text")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "full"), RWKVCLIPConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "full"), RWKVCLIPModel)
    assert isinstance(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "full"), RWKVCLIPModel)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "vision"), RWKVCLIPVisionModel)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "text"), RWKVCLIPTextModel)
    pixel_values = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        AutoModel.from_pretrained(tmp_path / "vision")(pixel_values).pooler_output,
        model.get_image_features(pixel_values).pooler_output,
        rtol=0,
        atol=0,
    )


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModel
    path, inputs_path, out_path = sys.argv[1:4]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__name__ == "RWKVCLIPConfig", type(config)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(inputs_path, weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    model.save_pretrained(path + "-resaved")  # a remote-code model can be saved and shared again
    resaved = AutoModel.from_pretrained(path + "-resaved", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(resaved(**inputs).logits_per_image, logits)
    torch.save(logits, out_path)
    """
)


def test_trust_remote_code_without_the_package(tmp_path, model, monkeypatch):
    use_torch_bi_wkv(model, monkeypatch)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    for name in (
        "configuration_rwkv_clip.py",
        "modeling_rwkv_clip.py",
        "bi_wkv.py",
        "bi_wkv_chunk.py",
        "bi_wkv_kernel.py",
        "block_ops.py",
        "bi_wkv_triton_op.py",
        "bi_wkv_triton_kernels.py",
    ):
        assert (model_dir / name).is_file(), name
    inputs = {"input_ids": torch.tensor([[BOS, 4, 9, EOS]]), "pixel_values": torch.randn(2, 3, 40, 32)}
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_the_package(
        REMOTE_CODE_SCRIPT, model_dir, tmp_path / "inputs.pt", tmp_path / "out.pt", cwd=tmp_path, timeout=300
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, rtol=0, atol=0)


def test_module_names_are_shared_by_both_towers(model):
    """One block class serves both towers; only the token shift differs."""
    text_block = model.text_model.encoder.layers[0]
    vision_block = model.vision_model.encoder.layers[0]
    assert type(text_block) is type(vision_block)
    assert text_block.token_mix.shift_offsets != vision_block.token_mix.shift_offsets
