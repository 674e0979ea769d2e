"""rwkv-clip-hf: RWKV-CLIP as a native Hugging Face transformers model.

Importing the package registers the configs and models with the transformers Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_rwkv_clip import PRESETS, RWKVCLIPConfig, RWKVCLIPTextConfig, RWKVCLIPVisionConfig
from .image_processing_rwkv_clip import RWKVCLIPImageProcessor
from .modeling_rwkv_clip import (
    RWKVCLIPForImageClassification,
    RWKVCLIPModel,
    RWKVCLIPOutput,
    RWKVCLIPPreTrainedModel,
    RWKVCLIPTextModel,
    RWKVCLIPVisionModel,
)
from .ops.bi_wkv import bi_wkv
from .processing_rwkv_clip import RWKVCLIPProcessor
from .tokenization_rwkv_clip import RWKVCLIPTokenizer

__version__ = "0.1.0"


def default_model_path() -> str:
    """Directory of the bundled default model (a tiny RWKV-CLIP trained on generated shapes, see its README)."""
    from importlib import resources

    return str(resources.files(__name__).joinpath("default_model"))


def _register() -> None:
    for config_class, model_class in (
        (RWKVCLIPConfig, RWKVCLIPModel),
        (RWKVCLIPTextConfig, RWKVCLIPTextModel),
        (RWKVCLIPVisionConfig, RWKVCLIPVisionModel),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(RWKVCLIPConfig, RWKVCLIPModel, exist_ok=True)
    AutoModelForImageClassification.register(RWKVCLIPConfig, RWKVCLIPForImageClassification, exist_ok=True)
    for config_class in (RWKVCLIPConfig, RWKVCLIPTextConfig):
        AutoTokenizer.register(config_class, tokenizer_class=RWKVCLIPTokenizer, exist_ok=True)
    for config_class in (RWKVCLIPConfig, RWKVCLIPVisionConfig):
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": RWKVCLIPImageProcessor}, exist_ok=True
        )
    AutoProcessor.register(RWKVCLIPConfig, RWKVCLIPProcessor, exist_ok=True)


_register()

__all__ = [
    "PRESETS",
    "RWKVCLIPConfig",
    "RWKVCLIPForImageClassification",
    "RWKVCLIPImageProcessor",
    "RWKVCLIPModel",
    "RWKVCLIPOutput",
    "RWKVCLIPPreTrainedModel",
    "RWKVCLIPProcessor",
    "RWKVCLIPTextConfig",
    "RWKVCLIPTextModel",
    "RWKVCLIPVisionConfig",
    "RWKVCLIPVisionModel",
    "RWKVCLIPTokenizer",
    "bi_wkv",
    "default_model_path",
]
