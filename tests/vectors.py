"""Where the public test vectors are: $CCOS_TEST_VECTORS, else shared/vectors beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def vectors_dir() -> Path:
    configured = os.environ.get("CCOS_TEST_VECTORS")
    if configured:
        return Path(configured)
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "vectors"
    if beside_checkout.is_dir():
        return beside_checkout
    return Path("/work/shared/vectors")


VECTORS = vectors_dir()
