"""conversion/convert_rwkv_clip_original.py on synthetic original-format checkpoints.

The synthetic checkpoints are built here from the layout of the released files (checked against the key
listing tests/data/original_checkpoint_keys_b32.txt), not from the converter's own layout table.
"""

import errno
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel

ROOT = Path(__file__).resolve().parents[1]
CONVERSION_DIR = ROOT / "conversion"
sys.path.insert(0, str(CONVERSION_DIR))

import convert_rwkv_clip_original as conv  # noqa: E402
import original_reference  # noqa: E402

KEY_LISTING = Path(__file__).parent / "data" / "original_checkpoint_keys_b32.txt"

B32 = {
    "width": 640, "patch": 32, "grid": 7, "img_depth": 12, "img_heads": 8, "img_ffn": 3200,
    "txt_depth": 6, "txt_heads": 10, "txt_ffn": 2240, "vocab": 49408, "mix_rank": 32, "decay_rank": 64,
}  # fmt: skip
B16 = {**B32, "patch": 16, "grid": 14}
# tiny stand-ins: B/16-like differs from B/32-like only in the patch projection and position embedding, as
# the released pair does; the towers have different head sizes (8 vs 16), as the released ones do (80 vs 64)
TINY_B32 = {
    "width": 32, "patch": 8, "grid": 4, "img_depth": 2, "img_heads": 4, "img_ffn": 160,
    "txt_depth": 2, "txt_heads": 2, "txt_ffn": 112, "vocab": 64, "mix_rank": 4, "decay_rank": 8,
}  # fmt: skip
TINY_B16 = {**TINY_B32, "patch": 4, "grid": 8}


# ---------------------------------------------------------------------------------------- synthetic checkpoints


def original_entries(dims):
    """(key, shape, dtype, kind) of every tensor of an original checkpoint with these sizes, in file order."""
    d = dims["width"]
    entries = [
        ("image_model.patch_embed.projection.weight", (d, 3, dims["patch"], dims["patch"]), "f32", "conv"),
        ("image_model.patch_embed.projection.bias", (d,), "f32", "bias"),
        ("image_model.pos_embed", (1, dims["grid"] ** 2, d), "f32", "pos"),
    ]

    def block(prefix, i, heads, ffn, mix_params, text):
        out = []
        for norm in (["ln0"] if i == 0 else []) + ["ln1", "ln2"]:
            out += [(f"{prefix}.{norm}.weight", (d,), "f32", "norm"), (f"{prefix}.{norm}.bias", (d,), "f32", "bias")]
        out += [(f"{prefix}.att.time_maa_{n}", (1, 1, d), "f32", "mix") for n in "xwkvrg"]
        low = "bf16" if text else "f32"  # the original creates the text decay and bonus as bfloat16
        out += [
            (f"{prefix}.att.time_maa_w1", (d, 5 * dims["mix_rank"]), "f32", "in0"),
            (f"{prefix}.att.time_maa_w2", (5, dims["mix_rank"], d), "f32", "in1"),
            (f"{prefix}.att.time_decay", (1, 1, d), low, "decay"),
            (f"{prefix}.att.time_decay_w1", (d, dims["decay_rank"]), "f32", "in0"),
            (f"{prefix}.att.time_decay_w2", (dims["decay_rank"], d), "f32", "in0"),
            (f"{prefix}.att.time_faaaa", (heads, d // heads), low, "bonus"),
        ]
        linears = ("receptance", "key", "value", "gate", "output")
        out += [(f"{prefix}.att.{n}.weight", (d, d), "f32", "linear") for n in linears]
        out += [(f"{prefix}.att.ln_x.weight", (d,), "f32", "norm"), (f"{prefix}.att.ln_x.bias", (d,), "f32", "bias")]
        out += [(f"{prefix}.ffn.{n}", (1, 1, d), "f32", "mix") for n in mix_params]
        out += [
            (f"{prefix}.ffn.key.weight", (ffn, d), "f32", "linear"),
            (f"{prefix}.ffn.receptance.weight", (d, d), "f32", "linear"),
            (f"{prefix}.ffn.value.weight", (d, ffn), "f32", "linear"),
        ]
        return out

    for i in range(dims["img_depth"]):
        mix = ("spatial_mix_k", "spatial_mix_r")
        entries += block(f"image_model.layers.{i}", i, dims["img_heads"], dims["img_ffn"], mix, False)
    entries += [("image_model.ln1.weight", (d,), "f32", "norm"), ("image_model.ln1.bias", (d,), "f32", "bias")]
    entries.append(("text_model.emb.weight", (dims["vocab"], d), "f32", "emb"))
    for i in range(dims["txt_depth"]):
        mix = ("time_maa_k", "time_maa_r")
        entries += block(f"text_model.blocks.{i}", i, dims["txt_heads"], dims["txt_ffn"], mix, True)
    entries += [("text_model.ln_out.weight", (d,), "f32", "norm"), ("text_model.ln_out.bias", (d,), "f32", "bias")]
    entries.append(("logit_scale", (), "f32", "scale"))
    return entries


DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}


def synthetic_original(dims, prefix="module.", seed=0, device="cpu"):
    """A random original-format state dict (meta tensors with device="meta"). O(1) values everywhere, decays
    over a wide range, so that every term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype, kind in original_entries(dims):
        if device == "meta":
            state[prefix + key] = torch.empty(shape, dtype=DTYPE[dtype], device="meta")
            continue
        r = torch.randn(shape, generator=g)
        value = {
            "conv": lambda: r / math.sqrt(math.prod(shape[1:])),
            "bias": lambda: 0.1 * r,
            "pos": lambda: 0.5 * r,
            "norm": lambda: 1.0 + 0.2 * r,
            # full float32 mantissas, like trained values (float32 rand gives multiples of 2^-24)
            "mix": lambda: torch.rand(shape, generator=g, dtype=torch.float64),
            "in0": lambda: r / math.sqrt(shape[0]),
            "in1": lambda: r / math.sqrt(shape[1]),
            "linear": lambda: r / math.sqrt(shape[-1]),
            "decay": lambda: torch.rand(shape, generator=g, dtype=torch.float64) * 4.0 - 3.0,
            "bonus": lambda: 0.5 * r,
            "emb": lambda: r,
            "scale": lambda: torch.tensor(math.log(1 / 0.07)) + 0.1 * r,
        }[kind]()
        state[prefix + key] = value.to(DTYPE[dtype])
    return state


def original_config_json(dims, **changes):
    """The authors' model_config format for these sizes."""
    d = dims["width"]
    config = {
        "workers": 10, "precision": "bf16", "dropout": 0.0, "input_size": dims["patch"] * dims["grid"],
        "image_depth": dims["img_depth"], "image_embed_dims": d, "image_patch_size": dims["patch"],
        "image_hidden_rate": dims["img_ffn"] // d, "image_num_heads": dims["img_heads"],
        "image_output_cls_token": False, "image_with_cls_token": False, "drop_path_rate": 0.3,
        "data_type": "utf-8", "ctx_len": 77, "vocab_size": dims["vocab"], "text_initialization": True,
        "head_size": d // dims["txt_heads"], "text_num_head": 0, "pos_emb": 0, "head_size_divisor": 8,
        "n_layer": dims["txt_depth"], "n_embd": d, "dim_att": d, "dim_ffn": dims["txt_ffn"], "head_qk": 0,
        "tiny_att_dim": 0, "tiny_att_layer": -999, "with_cp": False,
    }  # fmt: skip
    config.update(changes)
    return config


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models here are all small ops, which a second thread only slows down (much more so when
    another process shares the two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strip(state, prefix="module."):
    return {key.removeprefix(prefix): value for key, value in state.items()}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    state = synthetic_original(TINY_B32)
    path = tmp_path / "model_31.pt"
    torch.save(state, path)
    return path, state


# ---------------------------------------------------------------------------------------- the real layout


def read_key_listing():
    """The listing, with the blocks it elides (image 1..11, text 1..5 repeat block 1) written out."""
    entries = {}
    for line in KEY_LISTING.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
        repeat = {"image_model.layers.1.": 12, "text_model.blocks.1.": 6}
        for marker, depth in repeat.items():
            if key.startswith(marker):
                for i in range(1, depth):
                    entries[key.replace(marker, marker[:-2] + f"{i}.")] = (shape, dtype)
                break
        else:
            entries[key] = (shape, dtype)
    return entries


def test_synthetic_checkpoints_have_the_released_b32_layout():
    listing = read_key_listing()
    names = {"f32": "float32", "bf16": "bfloat16"}
    synthetic = {key: (shape, names[dtype]) for key, shape, dtype, _ in original_entries(B32)}
    assert synthetic == listing
    assert sum(math.prod(shape) for shape, _ in listing.values()) == pytest.approx(149.56e6, rel=1e-3)  # paper Table 8


@pytest.mark.parametrize("name, dims", [("B/32", B32), ("B/16", B16)])
def test_full_size_key_sets_convert_to_the_released_architectures(name, dims):
    """The real key set and shapes (meta tensors: no memory, no time) map one to one onto our model."""
    state = conv.normalize_keys(synthetic_original(dims, prefix="module._orig_mod.", device="meta"))
    config = conv.infer_config(state)
    preset = RWKVCLIPConfig.from_preset(name)
    assert config.text_config.to_dict() == preset.text_config.to_dict()
    assert config.vision_config.to_dict() == preset.vision_config.to_dict()
    assert conv.architecture_name(config) == name
    if name == "B/32":
        assert conv.original_layout(config) == {key: shape for key, (shape, _) in read_key_listing().items()}

    converted = conv.convert_state_dict(state, config, progress=False)
    with torch.device("meta"):
        ours = RWKVCLIPModel(preset).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert {v.dtype for v in converted.values()} == {torch.float32}


def test_key_mapping_table_maps_single_fused_and_unknown_keys():
    """The declarative table: a block key goes to its tower, the five time_maa_{w,k,v,r,g} fuse in that order,
    ln0 of block 0 is the tower's pre-norm; a key without a rule, a duplicate or a partial fused group is named."""
    assert conv.map_key("text_model.blocks.3.ln2.bias") == ("text_model.encoder.layers.3.norm2.bias", 0, 1, "same")
    assert conv.map_key("image_model.layers.0.ln0.weight")[0] == "vision_model.pre_layernorm.weight"
    assert conv.map_key("image_model.layers.1.ffn.spatial_mix_r")[::3] == (
        "vision_model.encoder.layers.1.channel_mix.time_maa_r",
        "one_minus",
    )
    fused = [f"image_model.layers.2.att.time_maa_{name}" for name in "wkvrg"]
    assert conv.conversion_plan(fused[::-1]) == [
        ("vision_model.encoder.layers.2.token_mix.time_maa_wkvrg", tuple(fused), "stack")
    ]
    with pytest.raises(conv.ConversionError, match=r"no conversion rule for the original key 'text_model\.ln0\.bias'"):
        conv.conversion_plan(["text_model.ln0.bias"])
    with pytest.raises(conv.ConversionError, match="original tensors missing for .*time_maa_wkvrg"):
        conv.conversion_plan(fused[:4])
    with pytest.raises(conv.ConversionError, match="both map to 'logit_scale'"):
        conv.conversion_plan(["logit_scale", "logit_scale"])


# ---------------------------------------------------------------------------------------- tiny end to end


@pytest.mark.parametrize("dims", [TINY_B32, TINY_B16], ids=["b32-like", "b16-like"])
def test_tiny_checkpoints_convert_load_and_match_the_reference(tmp_path, dims):
    from transformers import AutoModel

    original = synthetic_original(dims, seed=1)
    torch.save(original, tmp_path / "model_31.pt")
    result = conv.convert_checkpoint(tmp_path / "model_31.pt", tmp_path / "out", verify=True)
    assert result.verification.image < conv.VERIFY_TOLERANCE
    assert result.verification.text < conv.VERIFY_TOLERANCE
    assert {p.name for p in tmp_path.iterdir()} == {"model_31.pt", "out"}  # no staging leftovers
    umask = conv._current_umask()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    model = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(model, RWKVCLIPModel)
    assert model.config.vision_config.patch_size == dims["patch"]
    state = model.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float32}
    plain = strip(original)
    for i in range(dims["txt_depth"]):  # bf16 originals are widened exactly
        mix = f"text_model.encoder.layers.{i}.token_mix."
        assert plain[f"text_model.blocks.{i}.att.time_decay"].dtype == torch.bfloat16
        assert torch.equal(state[mix + "time_decay"], plain[f"text_model.blocks.{i}.att.time_decay"].float().flatten())
        assert torch.equal(state[mix + "time_faaaa"], plain[f"text_model.blocks.{i}.att.time_faaaa"].float())
    for i in range(dims["img_depth"]):  # spatial_mix -> time_maa = 1 - mix, rounded once
        spatial = plain[f"image_model.layers.{i}.ffn.spatial_mix_k"].double().flatten()
        assert torch.equal(state[f"vision_model.encoder.layers.{i}.channel_mix.time_maa_k"], (1 - spatial).float())

    # the loaded (float32-stored) model, run in float64, against the reference on other inputs than --verify's
    g = torch.Generator().manual_seed(5)
    size = dims["patch"] * dims["grid"]
    pixels = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64)
    captions = [[62, 5, 17, 63], [62, *torch.randint(1, 62, (40,), generator=g).tolist(), 63]]
    ids = torch.zeros(2, 77, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, : len(caption)] = torch.tensor(caption)
    model = model.double()
    with torch.no_grad():
        image = model.get_image_features(pixels).pooler_output
        text = model.get_text_features(ids).pooler_output
    torch.testing.assert_close(image, original_reference.image_embeddings(plain, pixels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, original_reference.text_embeddings(plain, ids), rtol=1e-5, atol=1e-6)


def test_cli_script_then_auto_classes_and_pipeline_reproduce_the_original(tmp_path):
    """Script run as a file, with the authors' config; then AutoProcessor + AutoModel on a real image and
    captions against the reference fed with the original's own preprocessing (tests/reference_tokenizer.py,
    tests/test_image_processing.py)."""
    from huggingface_hub import ModelCard
    from transformers import AutoModel, AutoProcessor, pipeline

    from reference_tokenizer import ReferenceTokenizer
    from test_image_processing import random_image, reference_pixels

    dims = {**TINY_B32, "vocab": 49408}  # the real vocabulary, so that the bundled tokenizer fits
    original = strip(synthetic_original(dims, seed=2))
    torch.save(original, tmp_path / "model_31.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(original_config_json(dims, head_size_divisor=4)))
    output = tmp_path / "RWKV-CLIP-B32-YFCC15M"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(CONVERSION_DIR / "convert_rwkv_clip_original.py"), "--checkpoint",
        str(tmp_path / "model_31.pt"), "--output", str(output), "--config", str(tmp_path / "cfg.json"), "--verify",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "image embeddings max relative difference" in run.stdout
    assert (run.stdout + run.stderr).count("image embeddings max relative difference") == 1  # not logged and printed
    assert "loading" in run.stderr and "verify" in run.stderr  # progress
    config = json.loads((output / "config.json").read_text())
    assert config["text_config"]["group_norm_eps"] == pytest.approx(1e-5 * 4**2)

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.license == "mit"
    assert card.data.datasets == [conv.KNOWN_TRAINING_DATA["YFCC15M"]["hub_id"]]  # from the output name
    assert "https://arxiv.org/abs/2406.06973" in card.text
    assert "AutoProcessor.from_pretrained(repo)" in card.text
    # the repository serves users without the package: the code of the model and of the processor parts
    code = {path.name for path in output.glob("*.py")}
    assert {
        "modeling_rwkv_clip.py",
        "tokenization_rwkv_clip.py",
        "image_processing_rwkv_clip.py",
        "processing_rwkv_clip.py",
    } <= code
    assert "AutoTokenizer" in json.loads((output / "tokenizer_config.json").read_text())["auto_map"]

    processor = AutoProcessor.from_pretrained(output)
    model = AutoModel.from_pretrained(output).double()
    image = random_image(45, 37, "RGB", seed=4)
    captions = ["a photo of a cat", "A RED double-decker bus &amp; more"]
    inputs = processor(text=captions, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.get_image_features(inputs["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    size = dims["patch"] * dims["grid"]
    reference_tokenizer = ReferenceTokenizer(ROOT / "src" / "rwkv_clip_hf" / "data" / "bpe_simple_vocab_16e6.txt.gz")
    ids = torch.tensor([reference_tokenizer(caption) for caption in captions])
    expected_image = original_reference.image_embeddings(original, reference_pixels(image, size)[None])
    expected_text = original_reference.text_embeddings(original, ids, head_size_divisor=4)
    torch.testing.assert_close(image_embeds, expected_image, rtol=1e-5, atol=1e-5)  # float32-stored weights
    torch.testing.assert_close(text_embeds, expected_text, rtol=1e-5, atol=1e-5)

    classifier = pipeline("zero-shot-image-classification", model=str(output))
    scores = {entry["label"]: entry["score"] for entry in classifier(image, candidate_labels=["cat", "bus"])}
    assert scores.keys() == {"cat", "bus"} and sum(scores.values()) == pytest.approx(1.0)


def test_bfloat16_output(tmp_path, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    result = conv.convert_checkpoint(checkpoint, tmp_path / "out", dtype="bfloat16", verify=True)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}
    report = result.verification
    assert report.passed and report.stored_dtype == "bfloat16"
    # the stored bf16 weights themselves are ~3 significant digits: visible, bounded
    assert 1e-4 < max(report.stored_image, report.stored_text) < 0.2


def test_card_of_a_released_architecture_lists_the_published_results():
    card = conv.model_card(
        RWKVCLIPConfig.from_preset("B/32"),
        repo_id="me/rwkv-clip",
        training_data=["YFCC15M"],
        checkpoint_name="model_31.pt",
        checkpoint_sha256="0" * 64,
        dtype="float32",
        verification=None,
    )
    assert "# RWKV-CLIP-B/32 (YFCC15M)" in card
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == ["## Published results", "## Usage", "## Limitations", "## Citation"]
    assert 'repo = "me/rwkv-clip"' in card and "trust_remote_code=True" in card and "@inproceedings{gu2024" in card
    table = next(line for line in card.splitlines() if line.startswith("| zero-shot top-1"))
    assert "ImageNet" in table
    assert conv.model_card.__doc__  # public function documented
    for values in conv.PUBLISHED_RESULTS[("B/32", "YFCC15M")].values():
        assert "| RWKV-CLIP | " + " | ".join(f"{v:.1f}" for v in values.values()) + " |" in card


@pytest.mark.parametrize(
    "names, expected",
    [
        (("user/RWKV-CLIP-B32-LAION10M", "out", "model_31.pt"), ["LAION10M"]),
        ((None, "rwkv_clip_b16_laion_10m", "x.pt"), ["LAION10M"]),  # separators and case do not matter
        ((None, "clip-laion400m", "x.pt"), []),
        ((None, "yfcc15m-vs-laion10m", "model_31.pt"), []),  # ambiguous: not guessed
        ((None, "out", "/cache/models--Kaichengalex--RWKV-CLIP-B32-LAION30M/snapshots/a/model_31.pt"), ["LAION30M"]),
        ((None, "out", "model_31.pt"), []),
    ],
)
def test_training_data_is_inferred_from_the_names(names, expected):
    assert conv.infer_training_data(*names) == expected


# ---------------------------------------------------------------------------------------- key handling, config


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 31},
        lambda s: {"model": s, "optimizer": {"lr": 1e-3}},
        lambda s: {"module._orig_mod." + k.removeprefix("module."): v for k, v in s.items()},
        lambda s: {"_orig_mod." + k: v for k, v in s.items()},
        lambda s: strip(s),
    ],
    ids=["ddp", "state_dict", "model", "ddp+compile", "compile+ddp", "bare"],
)
def test_prefixes_and_wrappers_are_accepted(tmp_path, wrap):
    state = synthetic_original(TINY_B32)
    torch.save(wrap(state), tmp_path / "ckpt.pt")
    loaded = conv.load_original_state_dict(tmp_path / "ckpt.pt")
    expected = strip(state)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) and loaded[k].dtype == expected[k].dtype for k in expected)


def test_original_config_supplies_context_and_divisor():
    state = strip(synthetic_original(TINY_B32))
    config = conv.infer_config(state, original_config_json(TINY_B32, ctx_len=32, head_size_divisor=2))
    assert config.text_config.max_position_embeddings == 32
    assert config.text_config.group_norm_eps == pytest.approx(1e-5 * 2**2)
    assert conv.infer_config(state).text_config.max_position_embeddings == 77  # the released context length


@pytest.mark.parametrize(
    "field",
    ["image_depth", "image_embed_dims", "image_patch_size", "image_hidden_rate", "image_num_heads", "input_size",
     "n_embd", "dim_att", "n_layer", "head_size", "text_num_head", "dim_ffn", "vocab_size"],
)  # fmt: skip
def test_original_config_disagreeing_with_the_tensors_is_named(field):
    state = strip(synthetic_original(TINY_B32))
    base = original_config_json(TINY_B32)
    bad = base[field] + 2 if field != "text_num_head" else 3
    with pytest.raises(conv.ConversionError, match=rf"\b{field}={bad}\b"):
        conv.infer_config(state, {**base, field: bad})


@pytest.mark.parametrize("field, value", [("image_with_cls_token", True), ("pos_emb", 1), ("head_qk", 8)])
def test_original_config_with_unsupported_features_is_refused(field, value):
    state = strip(synthetic_original(TINY_B32))
    with pytest.raises(conv.ConversionError, match=field):
        conv.infer_config(state, original_config_json(TINY_B32, **{field: value}))


# ---------------------------------------------------------------------------------------- error cases


class Payload:
    """Unpickling this would create a directory: the stand-in for code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": synthetic_original(TINY_B32), "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(conv.UnsafeCheckpointError, match=r"refusing to load .*evil\.pt.*os\.makedirs"):
        conv.convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out")
    assert conv.main(["--checkpoint", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_truncated_and_foreign_files_get_a_clear_error(tmp_path, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    for name in ("truncated.pt", "notes.pt"):
        with pytest.raises(conv.ConversionError, match=rf"cannot read .*{name} as a PyTorch checkpoint: .*truncated"):
            conv.convert_checkpoint(tmp_path / name, tmp_path / "out")
    with pytest.raises(conv.ConversionError, match="does not exist"):
        conv.convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(conv.ConversionError, match="holds a list, not a state dict"):
        conv.convert_checkpoint(tmp_path / "list.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edited_checkpoint(path, edit):
    state = synthetic_original(TINY_B32)
    edit(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("module.text_model.blocks.1.att.gate.weight"),
            r"missing keys: text_model\.blocks\.1\.att\.gate\.weight",
        ),
        (
            lambda s: s.update({"module.image_model.layers.0.att.extra": torch.zeros(3)}),
            r"unexpected keys: image_model\.layers\.0\.att\.extra",
        ),
        (
            lambda s: s.update({"module.image_model.layers.1.ffn.value.weight": torch.zeros(32, 150)}),
            r"wrong shapes: image_model\.layers\.1\.ffn\.value\.weight \(32, 150\) \(expected \(32, 160\)\)",
        ),
        (lambda s: s.update({"module.logit_scale": torch.tensor(3)}), r"non-floating-point tensors: logit_scale"),
        (lambda s: s.pop("module.text_model.emb.weight"), r"missing key 'text_model\.emb\.weight'"),
    ],
    ids=["missing", "extra", "shape", "integer", "missing-anchor"],
)
def test_key_errors_name_the_keys(tmp_path, edit, message):
    checkpoint = _edited_checkpoint(tmp_path / "model.pt", edit)
    with pytest.raises(conv.ConversionError, match=message):
        conv.convert_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_write_leaves_no_output(tmp_path, tiny_checkpoint, monkeypatch):
    checkpoint, _ = tiny_checkpoint

    def fail(directory, config):
        assert (Path(directory) / "model.safetensors").is_file()  # really mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "save_processor", fail)
    with pytest.raises(KeyboardInterrupt):
        conv.convert_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_31.pt"]

    # an existing output being replaced survives a failed replacement untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        conv.convert_checkpoint(checkpoint, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_31.pt", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.json"]
    assert (tmp_path / "out" / "config.json").read_text() == "old"


def test_non_empty_output_needs_overwrite(tmp_path, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    conv.convert_checkpoint(checkpoint, tmp_path / "out")
    first = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(conv.ConversionError, match=r"out exists and is not empty; pass --overwrite"):
        conv.convert_checkpoint(checkpoint, tmp_path / "out")
    conv.convert_checkpoint(checkpoint, tmp_path / "out", overwrite=True)  # a previous conversion is replaced
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns != first
    (tmp_path / "empty").mkdir()  # an empty directory is simply filled
    conv.convert_checkpoint(checkpoint, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_never_deletes_the_input_or_files_it_did_not_write(tmp_path, capsys):
    """--overwrite on the checkpoint's own folder (or one above it, or one holding other files) is refused up
    front: nothing is deleted, nothing is written."""
    source = tmp_path / "D"
    source.mkdir()
    checkpoint = source / "model_31.pt"
    torch.save(synthetic_original(TINY_B32), checkpoint)
    (source / "notes.txt").write_text("mine")
    config = tmp_path / "cfg" / "RWKV_CLIP.json"
    config.parent.mkdir()
    config.write_text(json.dumps(original_config_json(TINY_B32)))
    before = _tree(tmp_path)
    for output, inputs in (
        (source, []),
        (tmp_path, []),
        (source / "sub" / "..", []),
        (config.parent, ["--config", str(config)]),
    ):
        argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--overwrite", *inputs]
        assert conv.main(argv) == 2, output
        err = capsys.readouterr().err
        assert "contains the input" in err and ("model_31.pt" in err or "RWKV_CLIP.json" in err), err
        assert _tree(tmp_path) == before
    # a previous conversion's folder that has gained a file of the user's: refused, the file kept
    conv.convert_checkpoint(checkpoint, tmp_path / "out")
    (tmp_path / "out" / "results.csv").write_text("mine")
    before = _tree(tmp_path)
    assert conv.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--overwrite"]) == 2
    assert "did not write: results.csv" in capsys.readouterr().err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    def edit(state):
        state["module.text_model.blocks.1.att.key.weight"][3, 4] = bad

    checkpoint = _edited_checkpoint(tmp_path / "model.pt", edit)
    with pytest.raises(
        conv.ConversionError, match=r"non-finite values.*text_model\.blocks\.1\.att\.key\.weight \(1 of"
    ):
        conv.convert_checkpoint(checkpoint, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [("ctx_len", -5, "must be a positive integer"), ("ctx_len", None, "must be a positive integer"),
     ("ctx_len", 3.7, "must be a positive integer"), ("ctx_len", "77", "must be a positive integer"),
     ("head_size_divisor", True, "must be a positive integer"),
     ("drop_path_rate", "0.1", r"must be a number in \[0, 1\)"),
     ("drop_path_rate", 1.5, r"must be a number in \[0, 1\)"),
     ("n_layer", None, "n_layer=None but the tensors give 2")],
)  # fmt: skip
def test_invalid_original_config_values_are_named(tmp_path, tiny_checkpoint, capsys, field, value, message):
    checkpoint, _ = tiny_checkpoint
    config = tmp_path / "config.json"
    config.write_text(json.dumps(original_config_json(TINY_B32, **{field: value})))
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--config", str(config)]
    assert conv.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{field}={value!r}" in err and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unsupported_architecture_is_a_conversion_error(tmp_path, capsys):
    torch.save(synthetic_original({**TINY_B32, "mix_rank": 0}), tmp_path / "model.pt")
    assert conv.main(["--checkpoint", str(tmp_path / "model.pt"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's architecture is not supported: ValueError: RWKVCLIPTextConfig: mix_lora_rank" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unwritable_output_and_full_disk_are_conversion_errors(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    checkpoint, _ = tiny_checkpoint
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    with monkeypatch.context() as patch:
        patch.setattr("tempfile.mkdtemp", read_only)
        assert conv.main(argv) == 2
    assert f"cannot write the output {tmp_path / 'out'}: Permission denied ({tmp_path})" in capsys.readouterr().err

    def disk_full(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(RWKVCLIPModel, "save_pretrained", disk_full)
        assert conv.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write the output" in err and "No space left on device; nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_31.pt"]  # no staging folder left either


def test_unexpected_errors_exit_3_without_a_traceback(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    checkpoint, _ = tiny_checkpoint

    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(conv, "model_card", broken)
    assert conv.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "error: unexpected KeyError" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_31.pt"]


def test_stale_partial_folders_of_killed_runs_are_removed(tmp_path, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partials = {
        "dead": tmp_path / f".out.partial-{int(dead.stdout)}-abc123",
        "live": tmp_path / f".out.partial-{os.getpid()}-def456",
        "legacy-old": tmp_path / ".out.partial-k2j4h5g6",
        "legacy-new": tmp_path / ".out.partial-a1b2c3d4",
        "other-output": tmp_path / f".other.partial-{int(dead.stdout)}-abc123",
    }
    for path in partials.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 100)
    old = time.time() - 2 * conv.STALE_LEGACY_SECONDS
    os.utime(partials["legacy-old"], (old, old))
    conv.convert_checkpoint(checkpoint, tmp_path / "out")
    left = {name for name, path in partials.items() if path.exists()}
    assert left == {"live", "legacy-new", "other-output"}
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- verify can fail


def _without_one_minus(tensors):
    return tensors[0].reshape(-1)


def _stack_kwvrg(tensors):
    w, k, v, r, g = (t.reshape(-1) for t in tensors)
    return torch.stack([k, w, v, r, g])


@pytest.mark.parametrize("name, wrong", [("one_minus", _without_one_minus), ("stack", _stack_kwvrg)])
def test_verify_fails_on_a_wrong_mapping(tmp_path, tiny_checkpoint, monkeypatch, capsys, name, wrong):
    checkpoint, _ = tiny_checkpoint
    monkeypatch.setitem(conv.TRANSFORMS, name, wrong)
    code = conv.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--verify"])
    assert code == 1
    assert "does not reproduce the original-key reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_finished_directory(tmp_path, tiny_checkpoint, monkeypatch):
    checkpoint, _ = tiny_checkpoint
    calls = []

    class FakeApi:
        def whoami(self):
            calls.append(("whoami",))
            return {"name": "me"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            assert (Path(kwargs["folder_path"]) / "model.safetensors").is_file()
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr(conv, "HfApi", FakeApi)
    result = conv.convert_checkpoint(checkpoint, tmp_path / "out", push_to_hub="me/RWKV-CLIP-B32-LAION10M")
    assert [c[0] for c in calls] == ["whoami", "create_repo", "upload_folder"]
    assert calls[2][1:] == ("me/RWKV-CLIP-B32-LAION10M", result.output_dir)
    assert "datasets:\n- LAION10M" in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_checks_access_first_and_can_push_a_converted_folder(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    checkpoint, _ = tiny_checkpoint
    uploads, state = [], {"token": False, "upload_fails": True}

    class FakeApi:
        def whoami(self):
            if not state["token"]:
                raise OSError("Token is required (`token=True`), but no token found.")
            return {"name": "me"}

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            if state["upload_fails"]:
                raise ConnectionError("connection reset by peer")
            uploads.append((kwargs["repo_id"], Path(kwargs["folder_path"])))

    monkeypatch.setattr(conv, "HfApi", FakeApi)
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    # invalid ids and a missing login are refused before converting: nothing written
    for repo, message in (
        ("not a/valid id", "is not a valid repository id"),
        ("just-a-name", "NAMESPACE/NAME"),
        ("me/model", "cannot use the Hub .*no token found.*hf auth login"),
    ):
        assert conv.main([*argv, "--push-to-hub", repo]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    # an upload failure after the conversion: exit 2, the folder kept, the command to upload it alone given
    state["token"] = True
    assert conv.main([*argv, "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    retry = f"--output {(tmp_path / 'out').absolute()} --push-to-hub me/model"
    assert "upload of" in err and "connection reset by peer" in err and retry in err, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and not uploads
    state["upload_fails"] = False
    assert conv.main(retry.split()) == 0
    assert uploads == [("me/model", (tmp_path / "out").absolute())]
    assert conv.main(["--output", str(tmp_path), "--push-to-hub", "me/model"]) == 2  # not a converted folder
    assert "is not a converted directory (no config.json" in capsys.readouterr().err
