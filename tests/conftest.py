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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run torch and BLAS on one thread.

    The test networks are tiny: a second intra-op thread only adds contention (on a loaded 2-core
    machine it made small convolutions up to 100x slower), and joblib workers would oversubscribe.
    """
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)
