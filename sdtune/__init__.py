"""sdtune: Stable Diffusion personalization (Textual Inversion, LoRA) with files that load in every client."""

__version__ = "0.1.0"

from sdtune.compat import IncompatibleArtifactError  # noqa: E402
from sdtune.config import ConfigError, TrainConfig, load_config, parse_config  # noqa: E402
from sdtune.inference import AdapterPipeline  # noqa: E402
from sdtune.models import BaseModel, ModelError, detect_family, load_base_model, write_base_model  # noqa: E402

__all__ = [
    "AdapterPipeline",
    "BaseModel",
    "ConfigError",
    "IncompatibleArtifactError",
    "ModelError",
    "TrainConfig",
    "__version__",
    "detect_family",
    "load_base_model",
    "load_config",
    "parse_config",
    "write_base_model",
]
