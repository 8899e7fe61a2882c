import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

#: The offline face data and weights placed beside the repository (see ../shared/data/README.md).
SHARED_DATA = Path(os.environ.get("SKLEARN_CRAFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the real data are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA}")
    return SHARED_DATA
