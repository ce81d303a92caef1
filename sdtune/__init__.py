"""sdtune: Stable Diffusion personalization (Textual Inversion, LoRA) with files that load in every client."""

from sdtune._version import __version__
from sdtune.compat import IncompatibleArtifactError
from sdtune.config import ConfigError, TrainConfig, load_config, parse_config
from sdtune.errors import SdtuneError
from sdtune.inference import AdapterPipeline
from sdtune.models import BaseModel, ModelError, detect_family, load_base_model, write_base_model

__all__ = [
    "AdapterPipeline",
    "BaseModel",
    "ConfigError",
    "IncompatibleArtifactError",
    "ModelError",
    "SdtuneError",
    "TrainConfig",
    "__version__",
    "detect_family",
    "load_base_model",
    "load_config",
    "parse_config",
    "write_base_model",
]
