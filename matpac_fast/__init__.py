"""matpac_fast: fast pre-training of MATPAC / M2D self-supervised audio encoders."""

__version__ = "0.1.0"

from matpac_fast.frontend import PRESETS as FRONTEND_PRESETS  # noqa: E402
from matpac_fast.frontend import FrontendSpec, LogMelSpec, get_spec  # noqa: E402

__all__ = ["FRONTEND_PRESETS", "FrontendSpec", "LogMelSpec", "get_spec", "__version__"]

# The model and the encoder API (issue 4).
from matpac_fast.config import ModelConfig, get_model_config  # noqa: E402
from matpac_fast.encoder import Encoder, export_encoder_state, load_encoder  # noqa: E402
from matpac_fast.flops import flops_per_sample  # noqa: E402
from matpac_fast.model import MATPAC, StepState  # noqa: E402

__all__ += [
    "MATPAC",
    "Encoder",
    "ModelConfig",
    "StepState",
    "export_encoder_state",
    "flops_per_sample",
    "get_model_config",
    "load_encoder",
]
