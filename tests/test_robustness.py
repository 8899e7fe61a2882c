"""Unusual but legitimate use gives a correct result or a clear error (issue 12, "Robustness")."""

import threading

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_craft.pooling import ActivationPooler


def _images(n=6, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 3))


def _finishes(function, timeout=60):
    """``function()``'s result, computed in a daemon thread that must end within ``timeout`` seconds."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s (deadlock?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# ---------------------------------------------------------------- no global lock across user callbacks


@pytest.mark.parametrize("inner", ["same model", "other model"])
def test_preprocess_may_pool_with_another_pooler(inner):
    model, other = _net(), _net(seed=1)
    model.train()
    model[1].eval()
    flags = [module.training for module in model.modules()]
    images = _images()
    expected = ActivationPooler(model).fit(images).transform(images)
    nested = ActivationPooler(model if inner == "same model" else other, batch_size=2).fit(images)
    seen = []

    def pooling_preprocess(batch):
        seen.append(nested.transform(batch))
        return batch

    outer = ActivationPooler(model, batch_size=4, preprocess=pooling_preprocess)
    features = _finishes(lambda: outer.fit(images).transform(images))
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    assert len(seen) == 3  # one batch in fit, two in transform
    assert [module.training for module in model.modules()] == flags
    # Nothing is left locked: plain pooling in this thread still works.
    np.testing.assert_array_equal(ActivationPooler(model).fit(images).transform(images), expected)
