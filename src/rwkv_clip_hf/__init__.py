"""rwkv-clip-hf: RWKV-CLIP as a native Hugging Face transformers model.

Importing the package registers the configs and models with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_rwkv_clip import PRESETS, RWKVCLIPConfig, RWKVCLIPTextConfig, RWKVCLIPVisionConfig
from .modeling_rwkv_clip import (
    RWKVCLIPModel,
    RWKVCLIPOutput,
    RWKVCLIPPreTrainedModel,
    RWKVCLIPTextModel,
    RWKVCLIPVisionModel,
)
from .ops.bi_wkv import bi_wkv


__version__ = "0.1.0"


def _register() -> None:
    for config_class, model_class in (
        (RWKVCLIPConfig, RWKVCLIPModel),
        (RWKVCLIPTextConfig, RWKVCLIPTextModel),
        (RWKVCLIPVisionConfig, RWKVCLIPVisionModel),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(RWKVCLIPConfig, RWKVCLIPModel, exist_ok=True)


_register()

__all__ = [
    "PRESETS",
    "RWKVCLIPConfig",
    "RWKVCLIPModel",
    "RWKVCLIPOutput",
    "RWKVCLIPPreTrainedModel",
    "RWKVCLIPTextConfig",
    "RWKVCLIPTextModel",
    "RWKVCLIPVisionConfig",
    "RWKVCLIPVisionModel",
    "bi_wkv",
]
