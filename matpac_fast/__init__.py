"""matpac_fast: fast pre-training of MATPAC / M2D self-supervised audio encoders."""

__version__ = "0.1.0"

from matpac_fast.frontend import PRESETS as FRONTEND_PRESETS  # noqa: E402
from matpac_fast.frontend import FrontendSpec, LogMelSpec, get_spec  # noqa: E402

__all__ = ["FRONTEND_PRESETS", "FrontendSpec", "LogMelSpec", "get_spec", "__version__"]
