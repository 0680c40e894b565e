"""matpac_fast: fast pre-training of MATPAC / M2D self-supervised audio encoders.

The names below are imported on first use (PEP 562), not with the package: `make-shards`, `verify-shards` and the
small helper modules import `matpac_fast.<module>` without pulling in torch (2 s, and a Ctrl-C in those 2 s used
to print an import traceback instead of the tools' one-line message)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FRONTEND_PRESETS": ("matpac_fast.frontend", "PRESETS"),
    "FrontendSpec": ("matpac_fast.frontend", "FrontendSpec"),
    "LogMelSpec": ("matpac_fast.frontend", "LogMelSpec"),
    "get_spec": ("matpac_fast.frontend", "get_spec"),
    # The model and the encoder API (issue 4).
    "MATPAC": ("matpac_fast.model", "MATPAC"),
    "StepState": ("matpac_fast.model", "StepState"),
    "Encoder": ("matpac_fast.encoder", "Encoder"),
    "export_encoder_state": ("matpac_fast.encoder", "export_encoder_state"),
    "load_encoder": ("matpac_fast.encoder", "load_encoder"),
    "ModelConfig": ("matpac_fast.config", "ModelConfig"),
    "get_model_config": ("matpac_fast.config", "get_model_config"),
    "flops_per_sample": ("matpac_fast.flops", "flops_per_sample"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:  # a submodule, as `matpac_fast.config.get_model_config` after `import matpac_fast`
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but an import inside it failed: that error, not a missing attribute
            raise AttributeError(f"module 'matpac_fast' has no attribute {name!r}") from None
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
