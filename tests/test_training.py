"""Training under Trainer, the global-batch loss across ranks, text augmentation, the clamp, PEFT."""

import faulthandler
import math
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import EvalPrediction

from rwkv_clip_hf import RWKVCLIPForImageClassification, RWKVCLIPModel, RWKVCLIPProcessor
from rwkv_clip_hf.shapes import COLORS, make_shapes_dataset
from rwkv_clip_hf.training import (
    LORA_TARGET_MODULES,
    ClassificationTransform,
    ContrastiveCollator,
    ContrastiveLoss,
    ContrastiveTransform,
    GroupedRandomSampler,
    LogitScaleClampCallback,
    NonFiniteTrainingCallback,
    NonFiniteTrainingError,
    RWKVCLIPTrainer,
    classification_collator,
    compute_accuracy,
    contrastive_accumulation_step,
    paper_training_arguments,
)

from conftest import randomize_, real_vocab_config

IMAGE_SIZE = 32  # the image size of conftest.real_vocab_config


@pytest.fixture(scope="module")
def processor():
    return RWKVCLIPProcessor.from_bundled(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def shapes():
    return make_shapes_dataset(96, seed=0, image_size=IMAGE_SIZE)


def test_contrastive_loss_falls_under_trainer(tmp_path, processor, shapes):
    torch.manual_seed(0)
    model = RWKVCLIPModel(real_vocab_config())
    # 32 pairs seen repeatedly: the loss must fall well below chance (ln 16) within 60 steps
    dataset = shapes.select(range(32)).with_transform(ContrastiveTransform(processor, "image", ["caption"], seed=0))
    args = paper_training_arguments(
        str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=60,
        learning_rate=5e-3,
        warmup_steps=0.05,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    trainer = RWKVCLIPTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=ContrastiveCollator(processor.tokenizer)
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 60
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert first > 0.9 * math.log(16)  # starts near chance: ln(batch)
    assert last < 0.7 * first, (first, last)
    assert 0.0 <= model.logit_scale.item() <= math.log(100) + 1e-6


def _diverging_run(tmp_path, processor, shapes, guarded):
    torch.manual_seed(0)
    model = RWKVCLIPModel(real_vocab_config())
    dataset = shapes.select(range(32)).with_transform(ContrastiveTransform(processor, "image", ["caption"], seed=0))
    args = paper_training_arguments(
        str(tmp_path), per_device_train_batch_size=16, max_steps=4, learning_rate=1e6, warmup_steps=0,
        logging_steps=1, save_strategy="steps", save_steps=1, disable_tqdm=True, seed=0, use_cpu=True,
    )  # fmt: skip
    trainer = RWKVCLIPTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=ContrastiveCollator(processor.tokenizer),
    )  # fmt: skip
    assert any(isinstance(cb, NonFiniteTrainingCallback) for cb in trainer.callback_handler.callbacks)  # a default
    if not guarded:
        trainer.remove_callback(NonFiniteTrainingCallback)
    return model, trainer


def _saved_weights_are_finite(checkpoint) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(checkpoint / "model.safetensors").values())


def test_diverging_training_stops_before_saving_non_finite_weights(tmp_path, processor, shapes):
    # without the callback, Trainer trains on and saves NaN weights as if nothing happened
    model, trainer = _diverging_run(tmp_path / "plain", processor, shapes, guarded=False)
    trainer.train()
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not all(_saved_weights_are_finite(c) for c in (tmp_path / "plain").glob("checkpoint-*"))

    model, trainer = _diverging_run(tmp_path / "guarded", processor, shapes, guarded=True)
    with pytest.raises(NonFiniteTrainingError, match=r"training diverged at optimizer step \d+ .*NaN or infinite"):
        trainer.train()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # stopped before the bad step
    checkpoints = list((tmp_path / "guarded").glob("checkpoint-*"))
    assert all(_saved_weights_are_finite(c) for c in checkpoints)
    assert trainer.state.global_step < 4


def test_non_finite_weights_are_named():
    model = RWKVCLIPModel(real_vocab_config())
    with torch.no_grad():
        model.text_model.final_layer_norm.weight[0] = float("inf")

    class State:
        global_step, epoch = 5, 1.25

    with pytest.raises(
        NonFiniteTrainingError, match=r"step 5 \(epoch 1.25\): the weights .*text_model\.final_layer_norm"
    ):
        NonFiniteTrainingCallback().on_step_end(None, State(), None, model=model)


def test_trainer_weight_decay_groups(tmp_path):
    model = RWKVCLIPModel(real_vocab_config())
    trainer = RWKVCLIPTrainer(model=model, args=paper_training_arguments(str(tmp_path), use_cpu=True))
    decay = set(trainer.get_decay_parameter_names(model))
    assert "logit_scale" not in decay
    assert "vision_model.encoder.layers.0.norm1.weight" not in decay
    assert "vision_model.encoder.layers.0.token_mix.ln_x.weight" not in decay
    assert "vision_model.embeddings.patch_embedding.bias" not in decay
    assert "text_model.encoder.layers.0.token_mix.key.weight" in decay
    assert "text_model.encoder.layers.0.token_mix.time_decay" in decay
    assert any(isinstance(cb, LogitScaleClampCallback) for cb in trainer.callback_handler.callbacks)


def test_grouped_sampler_keeps_groups_together_and_reshuffles_per_epoch():
    groups = ["a", "b", "a", "c", "b", "a", "d"]  # members need not be adjacent
    sampler = GroupedRandomSampler(groups, seed=3)
    orders = [list(sampler) for _ in range(6)]
    for order in orders:
        assert sorted(order) == list(range(len(groups)))
        keys = [groups[i] for i in order]
        runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
        assert sorted(runs) == ["a", "b", "c", "d"]  # every group in one run
    assert len({tuple(o) for o in orders}) > 1  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]  # reproducible from (seed, epoch)
    assert list(GroupedRandomSampler(groups, seed=3)) == orders[0]
    with pytest.raises(ValueError, match="no rows"):
        GroupedRandomSampler([])


def _scene_runs(trainer):
    order = [s for batch in trainer.get_train_dataloader() for s in batch["scene"].tolist()]
    return order, [s for i, s in enumerate(order) if i == 0 or s != order[i - 1]]


def test_trainer_group_by_column_batches_whole_scenes(tmp_path):
    data = make_shapes_dataset(120, seed=0, image_size=IMAGE_SIZE, scene_size=6)
    scenes = list(data["scene"])
    data = data.with_transform(lambda batch: {"scene": batch["scene"]})
    args = paper_training_arguments(str(tmp_path), per_device_train_batch_size=12, use_cpu=True, seed=0)
    kwargs = dict(
        model=RWKVCLIPModel(real_vocab_config()),
        args=args,
        train_dataset=data,
        data_collator=lambda rows: {"scene": torch.tensor([r["scene"] for r in rows])},
    )
    order, runs = _scene_runs(RWKVCLIPTrainer(**kwargs, group_by_column="scene"))
    assert sorted(order) == sorted(scenes)
    assert len(runs) == len(set(scenes))  # each scene's rows come one after another
    _, random_runs = _scene_runs(RWKVCLIPTrainer(**kwargs))  # the default random order splits scenes
    assert len(random_runs) > 2 * len(set(scenes))
    with pytest.raises(KeyError, match="'shape_id'"):
        RWKVCLIPTrainer(**kwargs, group_by_column="shape_id")


def test_logit_scale_clamp():
    model = RWKVCLIPModel(real_vocab_config())
    callback = LogitScaleClampCallback()
    for value, expected in ((10.0, math.log(100)), (-1.0, 0.0), (2.0, 2.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        callback.on_step_end(None, None, None, model=model)
        assert model.logit_scale.item() == pytest.approx(expected)


def test_augmentation_frequencies_and_determinism(processor):
    batch = {
        "image": [None] * 3000,
        "raw": [f"raw {i}" for i in range(3000)],
        "synthetic": [f"syn {i}" for i in range(3000)],
        "generated": [f"gen {i}" if i % 2 else "" for i in range(3000)],  # half the rows lack Tg
    }
    transform = ContrastiveTransform(processor, "image", ["raw", "synthetic", "generated"], seed=7)
    chosen = transform.choose_captions(batch)
    kinds = np.array([c.split()[0] for c in chosen])
    with_tg, without_tg = kinds[1::2], kinds[0::2]
    for kind in ("raw", "syn", "gen"):  # uniform over the three where all exist: 1/3 each (sd ~0.012)
        assert abs((with_tg == kind).mean() - 1 / 3) < 0.05
    assert (without_tg == "gen").sum() == 0  # missing captions are never chosen...
    assert abs((without_tg == "raw").mean() - 0.5) < 0.05  # ...and the others share its probability
    # the same seed gives the same choices; another seed other choices
    again = ContrastiveTransform(processor, "image", ["raw", "synthetic", "generated"], seed=7).choose_captions(batch)
    other = ContrastiveTransform(processor, "image", ["raw", "synthetic", "generated"], seed=8).choose_captions(batch)
    assert again == chosen and other != chosen
    # custom probabilities
    weighted = ContrastiveTransform(processor, "image", ["raw", "synthetic"], probabilities=[0.8, 0.2], seed=0)
    kinds = np.array([c.split()[0] for c in weighted.choose_captions(batch)])
    assert abs((kinds == "raw").mean() - 0.8) < 0.04


def test_transform_errors_name_columns(processor, shapes):
    transform = ContrastiveTransform(processor, "image", ["caption"])
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        transform({"pixel_values": [1]})
    with pytest.raises(ValueError, match="probabilities"):
        ContrastiveTransform(processor, "image", ["a", "b"], probabilities=[1.0])
    with pytest.raises(ValueError, match="no non-empty caption"):
        transform.choose_captions({"image": [None], "caption": ["  "]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the ContrastiveLoss settings that must all give the single-process gradient under DDP
LOSS_SETTINGS = {
    "global": {},
    "local": {"local_loss": True},
    "no_grad_gather": {"gather_with_grad": False},
}


def _distributed_worker(rank, world_size, port, state, inputs, out_dir):
    # a hang prints every thread's stack and ends the worker (the test then fails with it) instead of stalling
    faulthandler.dump_traceback_later(90, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = RWKVCLIPModel(real_vocab_config())
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # uneven local batches (3 + 5): the gather pads and cuts back
        bounds = [0, 3, 8]
        local = {k: v[bounds[rank] : bounds[rank + 1]] for k, v in inputs.items()}
        results = {}
        for name, settings in LOSS_SETTINGS.items():
            model.zero_grad()
            outputs = ddp(**local)
            loss = ContrastiveLoss(**settings)(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
            loss.backward()  # DDP averages the gradients over ranks
            losses = [torch.zeros(()) for _ in range(world_size)]
            torch.distributed.all_gather(losses, loss.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = {"loss": loss.detach(), "losses": torch.stack(losses), "grads": grads}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "rank0.pt"))
        # tear DDP down while the process group is alive, then leave together: freeing DDP after
        # destroy_process_group hung rank 1 now and then (about 1 run in 15)
        del ddp, model, loss, outputs
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_loss_and_gradients_equal_single_process(tmp_path, processor, shapes):
    torch.manual_seed(0)
    model = randomize_(RWKVCLIPModel(real_vocab_config()), seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    rows = shapes.select(range(8))
    inputs = dict(processor(text=list(rows["caption"]), images=list(rows["image"]), padding=True, return_tensors="pt"))
    outputs = model(**inputs, return_loss=True)
    loss = outputs.loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # one process: the loss object is the model's own loss, bit for bit
    assert torch.equal(ContrastiveLoss()(outputs.image_embeds, outputs.text_embeds, model.logit_scale), loss)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    context = mp.spawn(_distributed_worker, args=(2, _free_port(), state, inputs, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=2):  # a hung collective must fail the test, not stall CI
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the 2-process run did not finish within 240 s")
    results = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert results.keys() == LOSS_SETTINGS.keys()
    for setting, result in results.items():
        if setting == "local":  # each rank scores its own rows; their mean is the global loss
            torch.testing.assert_close(result["losses"].mean(), loss.detach(), rtol=1e-5, atol=1e-6)
            assert abs(result["loss"].item() - loss.item()) > 1e-3
        else:
            torch.testing.assert_close(result["losses"], loss.detach().expand(2), rtol=1e-5, atol=1e-6)
        assert result["grads"].keys() == expected.keys(), setting
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=f"{setting}: {name}")
    # a wrong gather (local loss only) would give a different loss: make sure the batch split matters
    local_loss = model(**{k: v[:3] for k, v in inputs.items()}, return_loss=True).loss
    assert abs(local_loss.item() - loss.item()) > 1e-3


def test_model_loss_is_local_and_the_loss_object_refuses_mismatched_batches():
    model = randomize_(RWKVCLIPModel(real_vocab_config()), seed=3)
    images = torch.nn.functional.normalize(torch.randn(4, 32, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 32, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    logits = texts @ images.t() * scale.exp()
    # independent reference: -log softmax of the matching pair, both directions, averaged
    reference = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    loss_fn = ContrastiveLoss()
    torch.testing.assert_close(loss_fn(images, texts, scale), reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(ContrastiveLoss(local_loss=True)(images, texts, scale), reference, rtol=1e-12, atol=0)
    assert loss_fn.labels(4, 0, images.device) is loss_fn.labels(4, 0, images.device)  # cached
    with pytest.raises(ValueError, match="one caption per image"):
        loss_fn(images, texts[:3], scale)
    with pytest.raises(ValueError, match="local_loss=True needs gather_with_grad=True"):
        ContrastiveLoss(local_loss=True, gather_with_grad=False)
    del model


class _SavedActivations:
    """Peak bytes of the tensors autograd keeps for backward (parameters excluded), while active."""

    def __init__(self, model):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def _pack(self, tensor):
        if tensor.untyped_storage().data_ptr() in self.parameters:
            return tensor
        size = tensor.untyped_storage().nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        return _Counted(tensor, size, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Counted) else packed

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Counted:
    def __init__(self, tensor, size, counter):
        self.tensor, self.size, self.counter = tensor, size, counter

    def __del__(self):
        self.counter.live -= self.size


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_contrastive_accumulation_keeps_every_negative(processor, shapes):
    """4 micro-batches of 2 give the gradients of one batch of 8 with about a quarter of its activations."""
    model = randomize_(RWKVCLIPModel(real_vocab_config()), seed=4).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    rows = shapes.select(range(8))
    inputs = dict(processor(text=list(rows["caption"]), images=list(rows["image"]), padding=True, return_tensors="pt"))
    loss_fn = ContrastiveLoss()

    with _SavedActivations(model) as full_memory:
        outputs = model(**inputs)
        loss = loss_fn(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
        loss.backward()
    expected = _grads(model)
    model.zero_grad()
    with _SavedActivations(model) as accumulated_memory:
        value = contrastive_accumulation_step(model, inputs, loss_fn, micro_batches=4)
    torch.testing.assert_close(value, loss.detach(), rtol=1e-6, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert expected["logit_scale"].abs() > 0 and expected["text_model.token_embedding.weight"].abs().max() > 0
    assert accumulated_memory.peak < 0.4 * full_memory.peak, (accumulated_memory.peak, full_memory.peak)

    # Trainer's accumulation on top divides the gradients (not the returned value)
    model.zero_grad()
    contrastive_accumulation_step(model, inputs, loss_fn, micro_batches=3, loss_divisor=2.0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name] / 2, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="larger than the batch"):
        contrastive_accumulation_step(model, inputs, loss_fn, micro_batches=9)


def test_contrastive_accumulation_replays_drop_path(processor, shapes):
    """With drop-path, the second pass over each micro-batch draws the masks of the first one: the gradients
    equal those of the same micro-batches embedded once with a graph."""
    config = real_vocab_config(text_config={"drop_path_rate": 0.5}, vision_config={"drop_path_rate": 0.5})
    model = randomize_(RWKVCLIPModel(config), seed=5).train()
    rows = shapes.select(range(6))
    inputs = dict(processor(text=list(rows["caption"]), images=list(rows["image"]), padding=True, return_tensors="pt"))
    loss_fn = ContrastiveLoss()

    torch.manual_seed(3)
    pieces = [dict(zip(inputs, chunk)) for chunk in zip(*(v.tensor_split(3) for v in inputs.values()))]
    outputs = [model(**piece) for piece in pieces]
    images = torch.cat([o.image_embeds for o in outputs])
    texts = torch.cat([o.text_embeds for o in outputs])
    loss_fn(images, texts, model.logit_scale).backward()
    expected, rng_after = _grads(model), torch.get_rng_state()

    model.zero_grad()
    torch.manual_seed(3)
    contrastive_accumulation_step(model, inputs, loss_fn, micro_batches=3)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the random stream advances as for one pass
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    # and the masks matter: another seed gives other gradients
    model.zero_grad()
    torch.manual_seed(4)
    contrastive_accumulation_step(model, inputs, loss_fn, micro_batches=3)
    assert not torch.allclose(
        model.vision_model.post_layernorm.weight.grad, expected["vision_model.post_layernorm.weight"]
    )


def test_trainer_contrastive_micro_batches_step_equals_one_batch(tmp_path, processor, shapes):
    """One optimizer step of RWKVCLIPTrainer(contrastive_micro_batches=4) equals the plain step on the batch."""
    dataset = shapes.select(range(8)).with_transform(ContrastiveTransform(processor, "image", ["caption"], seed=0))
    states = {}
    for micro_batches in (1, 4):
        torch.manual_seed(0)
        model = randomize_(RWKVCLIPModel(real_vocab_config()), seed=6)
        args = paper_training_arguments(
            str(tmp_path / str(micro_batches)), per_device_train_batch_size=8, max_steps=1, learning_rate=1e-2,
            warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant", optim="sgd",
            save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = RWKVCLIPTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=ContrastiveCollator(processor.tokenizer),
            contrastive_micro_batches=micro_batches,
        )  # fmt: skip
        trainer.train()
        states[micro_batches] = {k: v.clone() for k, v in model.state_dict().items()}
    initial = randomize_(RWKVCLIPModel(real_vocab_config()), seed=6).state_dict()
    assert not torch.equal(
        states[1]["text_model.token_embedding.weight"], initial["text_model.token_embedding.weight"]
    )
    for name, value in states[1].items():
        torch.testing.assert_close(states[4][name], value, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="contrastive_micro_batches must be a positive integer"):
        RWKVCLIPTrainer(model=model, args=args, contrastive_micro_batches=0)


def test_lora_save_load_merge(tmp_path, processor):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = randomize_(RWKVCLIPModel(real_vocab_config()), seed=2).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES))
    targeted = {
        name.rsplit(".", 1)[-1] for name, _ in peft_model.named_modules() if name.endswith(tuple(LORA_TARGET_MODULES))
    }
    assert targeted == set(LORA_TARGET_MODULES)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters do something
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    text = processor.tokenizer(["a red circle", "two blue squares"], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted = peft_model(pixel_values=image, **text).logits_per_image
        plain = RWKVCLIPModel(real_vocab_config()).eval()
        plain.load_state_dict(base_state)
        assert not torch.allclose(plain(pixel_values=image, **text).logits_per_image, adapted, atol=1e-4)

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = RWKVCLIPModel(real_vocab_config()).eval()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=image, **text).logits_per_image, adapted, rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert type(merged) is RWKVCLIPModel
        torch.testing.assert_close(merged(pixel_values=image, **text).logits_per_image, adapted, rtol=1e-5, atol=1e-5)


def test_classification_under_trainer(tmp_path, processor, shapes):
    torch.manual_seed(0)
    config = real_vocab_config()
    config.num_labels = len(COLORS)
    model = RWKVCLIPForImageClassification(config)
    # classify the colour (a quick task for a tiny model); labels from a derived column
    colors = shapes.map(lambda row: {"color_id": list(COLORS).index(row["color"])}, remove_columns=["label"])
    transform = ClassificationTransform(processor.image_processor, "image", "color_id")
    train, test = (
        colors.select(range(64)).with_transform(transform),
        colors.select(range(64, 96)).with_transform(transform),
    )
    args = paper_training_arguments(
        str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        num_train_epochs=12,
        learning_rate=1e-2,
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = RWKVCLIPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=classification_collator,
        compute_metrics=compute_accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


def test_multi_label_transform_collator_loss_and_accuracy(processor, shapes):
    # lists of classes -> multi-hot rows -> a float label matrix -> binary cross-entropy, exact-match accuracy
    transform = ClassificationTransform(processor.image_processor, "image", "classes", num_labels=5)
    batch = transform({"image": list(shapes[:3]["image"]), "classes": [[0, 3], [4], []]})
    expected = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    collated = classification_collator(
        [{"pixel_values": p, "labels": y} for p, y in zip(batch["pixel_values"], batch["labels"])]
    )
    assert collated["labels"].dtype == torch.float32 and torch.equal(collated["labels"], expected)
    assert collated["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    single = classification_collator([{"pixel_values": batch["pixel_values"][0], "labels": 2}])
    assert single["labels"].dtype == torch.long and single["labels"].tolist() == [2]

    with pytest.raises(ValueError, match="num_labels"):
        ClassificationTransform(processor.image_processor, "image", "classes")(
            {"image": [shapes[0]["image"]], "classes": [[1]]}
        )
    with pytest.raises(ValueError, match=r"'classes': class 5 is not in \[0, 5\)"):
        transform({"image": [shapes[0]["image"]], "classes": [[5]]})

    config = real_vocab_config()
    config.num_labels, config.problem_type = 5, "multi_label_classification"
    model = RWKVCLIPForImageClassification(config)
    out = model(**collated)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(out.logits.double(), expected.double())
    torch.testing.assert_close(out.loss.double(), reference, rtol=1e-6, atol=1e-7)

    # a row counts when every one of its labels is right (logit > 0 <=> probability > 0.5)
    logits = np.array([[2.0, -1, -1, 0.5, -3], [1.0, -1, -1, -1, 2], [-1.0, -2, -1, -1, -1]])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=expected.numpy()))[
        "accuracy"
    ] == pytest.approx(2 / 3)
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=np.array([0, 4, 1])))[
        "accuracy"
    ] == pytest.approx(2 / 3)


def test_linear_probe_freezes_the_tower():
    config = real_vocab_config()
    config.num_labels = 3
    model = RWKVCLIPForImageClassification(config)
    model.vision_model.requires_grad_(False)
    out = model(pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.vision_model.parameters())
