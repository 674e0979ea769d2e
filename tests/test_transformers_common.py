# Copyright 2021 The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""transformers' common model tests (`ModelTesterMixin`, `ConfigTester`, vendored in tests/transformers_common/)
applied to the vision tower, the text tower, the dual encoder and the image classifier, structured like
transformers' `tests/models/clip/test_modeling_clip.py` (ModelTester classes building tiny configs; one TestCase per
class; CLIP's overrides and skips where the same reasons hold here).

Skips, each with its reason: attention tests (RWKV-CLIP has no attention layers: `has_attentions = False`, and
like transformers' other attention-free models it declares no SDPA support), `inputs_embeds` tests and embedding
getters of the dual encoder and the classifier (as CLIP), the text tower's `retain_grad` of hidden states (they are
read back at the input positions from the tower's fixed-length layout, so they are copies off the autograd path),
the reverse loading mapping (the towers' weight renaming only loads full checkpoints, the precedent being
transformers' VLM tests), and the cases where a common test has nothing to check for a class (upstream passes
those silently; the vendored mixin skips them with the reason: not a classifier, a base model in the training
tests, no buffers, no tied weights, ...).
"""

import copy
import inspect
import tempfile
import unittest

import torch
from torch import nn
from transformers import set_seed

from rwkv_clip_hf import (
    RWKVCLIPConfig,
    RWKVCLIPForImageClassification,
    RWKVCLIPModel,
    RWKVCLIPTextConfig,
    RWKVCLIPTextModel,
    RWKVCLIPVisionConfig,
    RWKVCLIPVisionModel,
)

from transformers_common.configuration_common import ConfigTester
from transformers_common.modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

NO_INPUTS_EMBEDS = "RWKV-CLIP does not use inputs_embeds (as CLIP)"
NO_ATTENTION_TO_SET = (
    "RWKV-CLIP has no attention layers: there is no attention implementation to set (like transformers' other "
    "attention-free models, it does not declare SDPA support)"
)
TOWER_MAPPING_ONE_WAY = (
    "Intentionally not reversible: the tower's weight renaming only loads full RWKV-CLIP checkpoints "
    "(`text_model.*` / `vision_model.*`); a tower saves under its own names"
)


class RWKVCLIPConfigTester(ConfigTester):
    """Upstream's `ConfigTester`, with one adaptation: its common-properties check sets the i-th property to i
    (`hidden_size=0`, ...), values the RWKV-CLIP configs reject (`hidden_size` must be a positive multiple of
    `head_size`, the layer count positive; `logit_scale_init_value` is a float), so that check uses `common_values`
    instead: the same getter, setter and constructor checks with valid values. As for transformers' RWKV,
    `num_attention_heads` is not a common property: it is derived (`hidden_size // head_size`)."""

    def __init__(self, parent, common_values, **kwargs):
        super().__init__(parent, common_properties=list(common_values), **kwargs)
        self.common_values = common_values

    def create_and_test_config_common_properties(self):
        config = self.config_class(**self.inputs_dict)
        for name, value in self.common_values.items():
            self.parent.assertTrue(hasattr(config, name), msg=f"`{name}` does not exist")
            setattr(config, name, value)
            self.parent.assertEqual(getattr(config, name), value)
        for name, value in self.common_values.items():
            config = self.config_class(**{name: value})
            self.parent.assertEqual(getattr(config, name), value)


class RWKVCLIPVisionModelTester:
    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
        is_training=True,
        hidden_size=32,
        head_size=8,
        num_hidden_layers=2,
        intermediate_size=40,
        mix_lora_rank=4,
        decay_lora_rank=6,
        drop_path_rate=0.1,
        initializer_range=0.02,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.mix_lora_rank = mix_lora_rank
        self.decay_lora_rank = decay_lora_rank
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.generator = torch.Generator().manual_seed(0)

        # no class token: the sequence is the patch grid
        self.seq_length = (image_size // patch_size) ** 2

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor(
            [self.batch_size, self.num_channels, self.image_size, self.image_size], generator=self.generator
        )
        config = self.get_config()
        return config, pixel_values

    def get_config(self):
        return RWKVCLIPVisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            head_size=self.head_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            mix_lora_rank=self.mix_lora_rank,
            decay_lora_rank=self.decay_lora_rank,
            drop_path_rate=self.drop_path_rate,
            initializer_range=self.initializer_range,
        )

    def create_and_check_model(self, config, pixel_values):
        model = RWKVCLIPVisionModel(config=config)
        model.to(pixel_values.device)
        model.eval()
        with torch.no_grad():
            result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class RWKVCLIPVisionModelTest(ModelTesterMixin, unittest.TestCase):
    """The vision tower has no token embedding (patch convolution), no text input and no `inputs_embeds`."""

    all_model_classes = (RWKVCLIPVisionModel,)
    test_resize_embeddings = False
    has_attentions = False

    def setUp(self):
        set_seed(0)  # the common tests initialise models from the global RNG: same weights in any test order
        self.model_tester = RWKVCLIPVisionModelTester(self)
        self.config_tester = RWKVCLIPConfigTester(
            self,
            config_class=RWKVCLIPVisionConfig,
            has_text_modality=False,
            common_values={"hidden_size": 160, "num_hidden_layers": 3},
            hidden_size=64,
            head_size=16,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # as CLIP's vision test: the input embedding is the patch convolution
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), (nn.Module))
            x = model.get_output_embeddings()
            self.assertTrue(x is None or isinstance(x, nn.Linear))

    def test_forward_signature(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            signature = inspect.signature(model.forward)
            arg_names = [*signature.parameters.keys()]
            self.assertListEqual(arg_names[:1], ["pixel_values"])

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

    @unittest.skip(reason=TOWER_MAPPING_ONE_WAY)
    def test_reverse_loading_mapping(self):
        pass


class RWKVCLIPTextModelTester:
    def __init__(
        self,
        parent,
        batch_size=4,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        vocab_size=99,
        hidden_size=32,
        head_size=8,
        num_hidden_layers=2,
        intermediate_size=48,
        mix_lora_rank=4,
        decay_lora_rank=6,
        drop_path_rate=0.1,
        max_position_embeddings=12,
        initializer_range=0.02,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.mix_lora_rank = mix_lora_rank
        self.decay_lora_rank = decay_lora_rank
        self.drop_path_rate = drop_path_rate
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.generator = torch.Generator().manual_seed(1)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size, generator=self.generator)

        input_mask = None
        if self.use_input_mask:
            # as CLIP's tester: right padding from a random position on, at least one real token per row
            input_mask = torch.zeros_like(input_ids)
            starts = torch.randint(1, self.seq_length - 1, (self.batch_size,), generator=self.generator)
            for batch_idx, start_index in enumerate(starts.tolist()):
                input_mask[batch_idx, :start_index] = 1

        config = self.get_config()
        return config, input_ids, input_mask

    def get_config(self):
        return RWKVCLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            head_size=self.head_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            mix_lora_rank=self.mix_lora_rank,
            decay_lora_rank=self.decay_lora_rank,
            drop_path_rate=self.drop_path_rate,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            bos_token_id=self.vocab_size - 2,
            eos_token_id=self.vocab_size - 1,
        )

    def create_and_check_model(self, config, input_ids, input_mask):
        model = RWKVCLIPTextModel(config=config)
        model.to(input_ids.device)
        model.eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
            result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


class RWKVCLIPTextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RWKVCLIPTextModel,)
    has_attentions = False

    def setUp(self):
        set_seed(0)  # the common tests initialise models from the global RNG: same weights in any test order
        self.model_tester = RWKVCLIPTextModelTester(self)
        self.config_tester = RWKVCLIPConfigTester(
            self,
            config_class=RWKVCLIPTextConfig,
            common_values={"hidden_size": 128, "num_hidden_layers": 3, "vocab_size": 5},
            hidden_size=64,
            head_size=16,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

    def test_forward_signature(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            signature = inspect.signature(model.forward)
            arg_names = [*signature.parameters.keys()]
            self.assertListEqual(arg_names[:2], ["input_ids", "attention_mask"])

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds(self):
        pass

    @unittest.skip(
        reason="The text tower runs on its fixed-length layout and reads its hidden states back at the input "
        "positions (a gather), so the returned states are copies off the autograd path of the outputs"
    )
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason=TOWER_MAPPING_ONE_WAY)
    def test_reverse_loading_mapping(self):
        pass


class RWKVCLIPModelTester:
    def __init__(self, parent, text_kwargs=None, vision_kwargs=None, is_training=True):
        self.parent = parent
        self.text_model_tester = RWKVCLIPTextModelTester(parent, **(text_kwargs or {}))
        self.vision_model_tester = RWKVCLIPVisionModelTester(parent, **(vision_kwargs or {}))
        self.batch_size = self.text_model_tester.batch_size  # need bs for batching_equivalence test
        self.is_training = is_training

    def prepare_config_and_inputs(self):
        text_config, input_ids, attention_mask = self.text_model_tester.prepare_config_and_inputs()
        vision_config, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        config = self.get_config()
        return config, input_ids, attention_mask, pixel_values

    def get_config(self):
        return RWKVCLIPConfig(
            text_config=self.text_model_tester.get_config().to_dict(),
            vision_config=self.vision_model_tester.get_config().to_dict(),
        )

    def create_and_check_model(self, config, input_ids, attention_mask, pixel_values):
        model = RWKVCLIPModel(config).to(input_ids.device).eval()
        with torch.no_grad():
            result = model(input_ids, pixel_values, attention_mask)
        self.parent.assertEqual(
            result.logits_per_image.shape, (self.vision_model_tester.batch_size, self.text_model_tester.batch_size)
        )
        self.parent.assertEqual(
            result.logits_per_text.shape, (self.text_model_tester.batch_size, self.vision_model_tester.batch_size)
        )

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, pixel_values = self.prepare_config_and_inputs()
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "return_loss": True,
        }
        return config, inputs_dict


class RWKVCLIPModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RWKVCLIPModel,)
    test_resize_embeddings = False
    has_attentions = False
    _is_composite = True

    def setUp(self):
        set_seed(0)  # the common tests initialise models from the global RNG: same weights in any test order
        self.model_tester = RWKVCLIPModelTester(self)
        self.config_tester = RWKVCLIPConfigTester(
            self, config_class=RWKVCLIPConfig, has_text_modality=False, common_values={"logit_scale_init_value": 2.5}
        )

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason=NO_ATTENTION_TO_SET)
    def test_can_set_attention_dynamically_composite_model(self):
        pass

    @unittest.skip(reason=TOWER_MAPPING_ONE_WAY)
    def test_reverse_loading_mapping(self):
        pass

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="RWKVCLIPModel does not have input/output embeddings (as CLIPModel)")
    def test_model_get_set_embeddings(self):
        pass

    def test_load_vision_text_config(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()

        # Save RWKVCLIPConfig and check if we can load RWKVCLIPVisionConfig from it
        with tempfile.TemporaryDirectory() as tmp_dir_name:
            config.save_pretrained(tmp_dir_name)
            vision_config = RWKVCLIPVisionConfig.from_pretrained(tmp_dir_name)
            self.assertDictEqual(config.vision_config.to_dict(), vision_config.to_dict())

        # Save RWKVCLIPConfig and check if we can load RWKVCLIPTextConfig from it
        with tempfile.TemporaryDirectory() as tmp_dir_name:
            config.save_pretrained(tmp_dir_name)
            text_config = RWKVCLIPTextConfig.from_pretrained(tmp_dir_name)
            self.assertDictEqual(config.text_config.to_dict(), text_config.to_dict())

    def test_model_logit_scale_initialization(self):
        # CLIP's `test_initialization` override for the dual encoder: the temperature starts at its config value
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = RWKVCLIPModel(copy.deepcopy(config))
        torch.testing.assert_close(model.logit_scale.detach(), torch.tensor(config.logit_scale_init_value))
        with tempfile.TemporaryDirectory() as tmp_dir_name:
            model.save_pretrained(tmp_dir_name)
            reloaded = RWKVCLIPModel.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
        self.assertAlmostEqual(reloaded.logit_scale.item(), config.logit_scale_init_value, places=5)


class RWKVCLIPForImageClassificationModelTester(RWKVCLIPModelTester):
    def __init__(self, parent):
        super().__init__(parent)
        self.batch_size = self.vision_model_tester.batch_size
        self.num_hidden_layers = self.vision_model_tester.num_hidden_layers
        self.hidden_size = self.vision_model_tester.hidden_size
        self.seq_length = self.vision_model_tester.seq_length

    def prepare_config_and_inputs(self):
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        config = self.get_config()
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class RWKVCLIPForImageClassificationModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RWKVCLIPForImageClassification,)
    test_resize_embeddings = False
    has_attentions = False
    _is_composite = True

    def setUp(self):
        set_seed(0)  # the common tests initialise models from the global RNG: same weights in any test order
        self.model_tester = RWKVCLIPForImageClassificationModelTester(self)

    @unittest.skip(reason=NO_ATTENTION_TO_SET)
    def test_can_set_attention_dynamically_composite_model(self):
        pass

    @unittest.skip(reason=TOWER_MAPPING_ONE_WAY)
    def test_reverse_loading_mapping(self):
        pass

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="RWKVCLIPForImageClassification does not support inputs_embeds (as CLIP's classifier)")
    def test_model_get_set_embeddings(self):
        pass

    def test_model(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = RWKVCLIPForImageClassification(config).eval()
        labels = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, config.num_labels))
        self.assertEqual(result.loss.shape, ())
