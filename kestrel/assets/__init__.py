"""Files shipped inside the package: the default model kestrel uses when given none."""

from __future__ import annotations

import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")


def default_model_path() -> str:
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}; pass a model folder"
        )
    return DEFAULT_MODEL_DIR
