import pytest
import torch

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel, RWKVCLIPTextConfig, RWKVCLIPVisionConfig


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "preset,patch,image_params",
    [("B/32", 32, 84.21e6), ("B/16", 16, 82.83e6), ("rwkv-clip-b16", 16, 82.83e6), ("b32", 32, 84.21e6)],
)
def test_presets_match_the_released_architectures(preset, patch, image_params):
    config = RWKVCLIPConfig.from_preset(preset)
    vision, text = config.vision_config, config.text_config
    assert (vision.patch_size, vision.image_size, vision.hidden_size, vision.num_hidden_layers) == (
        patch,
        224,
        640,
        12,
    )
    assert (vision.head_size, vision.num_attention_heads, vision.intermediate_size) == (80, 8, 3200)
    assert (text.hidden_size, text.num_hidden_layers, text.head_size, text.num_attention_heads) == (640, 6, 64, 10)
    assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings, text.pad_token_id) == (
        2240,
        49408,
        77,
        0,
    )
    assert text.group_norm_eps == pytest.approx(1e-5 * 8**2) and vision.group_norm_eps == pytest.approx(1e-5)
    assert vision.drop_path_rate == pytest.approx(0.3) and config.projection_dim == 640
    with torch.device("meta"):
        model = RWKVCLIPModel(config)
    # paper Table 8: image 84.21M (B/32) / 82.83M (B/16), text 65.35M
    assert round(count(model.vision_model) / 1e6, 2) == round(image_params / 1e6, 2)
    assert round(count(model.text_model) / 1e6, 2) == 65.35


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown RWKV-CLIP preset 'L/14'"):
        RWKVCLIPConfig.from_preset("L/14")


def test_preset_overrides():
    config = RWKVCLIPConfig.from_preset("B/16", vision_config={"drop_path_rate": 0.0}, logit_scale_init_value=1.0)
    assert config.vision_config.patch_size == 16 and config.vision_config.drop_path_rate == 0.0
    assert config.logit_scale_init_value == 1.0


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (RWKVCLIPVisionConfig, {"hidden_size": 100, "head_size": 80}, "multiple of head_size"),
        (RWKVCLIPVisionConfig, {"hidden_size": 82 * 8, "head_size": 82}, "divisible by 4"),
        (RWKVCLIPTextConfig, {"hidden_size": 21 * 3, "head_size": 21}, "divisible by 2"),
        (RWKVCLIPVisionConfig, {"image_size": 200, "patch_size": 32}, "multiple of patch_size"),
        (RWKVCLIPVisionConfig, {"token_shift": "spiral"}, "token_shift must be one of"),
        (RWKVCLIPVisionConfig, {"drop_path_rate": 1.0}, "drop_path_rate"),
        (RWKVCLIPTextConfig, {"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
        (RWKVCLIPTextConfig, {"vocab_size": 0}, "vocab_size must be positive"),
    ],
)
def test_invalid_tower_configs_raise_at_config_time(cls, kwargs, message):
    with pytest.raises(Exception, match=message):
        cls(**kwargs)


def test_towers_must_share_the_embedding_width():
    with pytest.raises(Exception, match="must equal vision_config.hidden_size"):
        RWKVCLIPConfig(text_config={"hidden_size": 512, "head_size": 64})


def test_config_round_trip(tmp_path):
    config = RWKVCLIPConfig.from_preset("B/16")
    config.save_pretrained(tmp_path)
    loaded = RWKVCLIPConfig.from_pretrained(tmp_path)
    assert loaded.vision_config.patch_size == 16
    assert loaded.text_config.group_norm_eps == config.text_config.group_norm_eps
    assert loaded.auto_map["AutoModel"] == "modeling_rwkv_clip.RWKVCLIPModel"
    assert (tmp_path / "modeling_rwkv_clip.py").is_file()


def test_special_token_ids_outside_the_vocabulary_warn_like_transformers(tmp_path, caplog):
    # transformers only warns (Hub configs carry such ids); a small vocabulary without token ids must load
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            config = RWKVCLIPTextConfig(vocab_size=20)
        assert config.bos_token_id == 49406
        assert "bos_token_id must be `None` or an integer within the vocabulary" in caplog.text
        RWKVCLIPConfig.from_preset("B/32").save_pretrained(tmp_path)
        loaded = RWKVCLIPConfig.from_pretrained(tmp_path, text_config={"vocab_size": 20})
        assert loaded.text_config.vocab_size == 20
    finally:
        hf_logging.disable_propagation()


@pytest.mark.parametrize("cls", [RWKVCLIPTextConfig, RWKVCLIPVisionConfig, RWKVCLIPConfig])
def test_validate_architecture_calls_the_base(cls, monkeypatch):
    from transformers import PreTrainedConfig

    calls = []
    original = PreTrainedConfig.validate_architecture
    monkeypatch.setattr(PreTrainedConfig, "validate_architecture", lambda self: calls.append(self) or original(self))
    config = cls()
    calls.clear()
    config.validate_architecture()
    assert calls == [config]
