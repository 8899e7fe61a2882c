"""Passes that start from the values a GraphPrefix kept: the same numbers as from the images."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sklearn_craft._prefix
from sklearn_craft._prefix import GraphPrefix
from sklearn_craft.finetune import _recalibrate_batchnorm, recalibrate_batchnorm
from sklearn_craft.images import as_image_dataset
from sklearn_craft.pooling import _iter_pooled


class _Residual(nn.Module):
    """A skip connection, and in-place operations on the values kept before them (node ``mul_``)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)).mul_(2))
        return self.conv3(x + self.relu(self.bn2(self.conv2(x))))


def _network():
    torch.manual_seed(0)
    net = _Residual()
    for norm in (net.bn1, net.bn2):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    return torch.fx.symbolic_trace(net).eval()


@pytest.fixture
def images():
    return as_image_dataset(torch.randn(20, 2, 9, 9, generator=torch.Generator().manual_seed(1)))


def _pooled(model, images, prefix=None, keep=None, layers=("conv2", "conv3")):
    options = dict(batch_size=8, device="cpu", preprocess=None, progress=False)
    batches = _iter_pooled(model, {layer: layer for layer in layers}, images, prefix=prefix, keep=keep, **options)
    return np.concatenate(list(batches))


def _counting(model):
    calls = []
    model.get_submodule("conv1").register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return calls


def test_a_pass_from_kept_values_equals_one_from_the_images(images):
    model = _network()
    prefix = GraphPrefix(images, 8, "cpu", None, 0)
    expected = _pooled(model, images)
    np.testing.assert_array_equal(_pooled(model, images, prefix, keep="mul_"), expected)
    assert prefix.cut == "mul_" and len(prefix.stored) == 3
    # Each kept value of the 3 batches is a view of one block for all the images (one allocation).
    for name, first in prefix.stored[0].items():
        assert first.untyped_storage().nbytes() == len(images) * first[0].nelement() * first.element_size()
        assert {batch[name].untyped_storage().data_ptr() for batch in prefix.stored} == {first.untyped_storage().data_ptr()}

    calls = _counting(model)
    np.testing.assert_array_equal(_pooled(model, images, prefix), expected)
    np.testing.assert_array_equal(_pooled(model, images, prefix), expected)
    assert calls == []


def test_kept_values_serve_a_copy_changed_after_the_cut_only(images):
    model = _network()
    prefix = GraphPrefix(images, 8, "cpu", None, 0)
    _pooled(model, images, prefix, keep="mul_")

    after = copy.deepcopy(model)
    with torch.no_grad():
        after.conv3.weight.mul_(2)
        after.bn2.running_mean.add_(1)
    expected = _pooled(copy.deepcopy(after), images)
    calls = _counting(after)
    np.testing.assert_array_equal(_pooled(after, images, prefix), expected)
    assert calls == []

    before = copy.deepcopy(model)
    with torch.no_grad():
        before.bn1.running_mean.add_(1)
    expected = _pooled(copy.deepcopy(before), images)
    calls = _counting(before)
    np.testing.assert_array_equal(_pooled(before, images, prefix), expected)
    assert calls == [8, 8, 4]
    # A pass that watches a module before the cut starts from the images too.
    assert prefix.values(model, [model.conv1]) is None and prefix.values(model, [model.conv3]) is not None


def test_batchnorm_statistics_from_kept_values_are_those_from_the_images(images):
    model = _network()
    prefix = GraphPrefix(images, 8, "cpu", None, 0)
    _pooled(model, images, prefix, keep="mul_")
    expected = recalibrate_batchnorm(copy.deepcopy(model), images, batch_size=8, layers=["bn2"]).state_dict()
    calls = _counting(model)
    _recalibrate_batchnorm(model, images, batch_size=8, layers=["bn2"], prefix=prefix)
    # The example that orders the layers runs the whole network once; no pass starts from the images.
    assert calls == [1]
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_a_prefix_keeps_nothing_over_its_budget(images, monkeypatch):
    model = _network()
    prefix = GraphPrefix(images, 8, "cpu", None, 0)
    monkeypatch.setattr(sklearn_craft._prefix, "_PREFIX_BYTES", 2 * 8 * 6 * 9 * 9 * 4)
    np.testing.assert_array_equal(_pooled(model, images, prefix, keep="mul_"), _pooled(model, images))
    assert prefix.stored is None
    # Neither does a node whose pass a hook stops before it, nor a node the graph does not have.
    _pooled(model, images, prefix, keep="conv3", layers=("conv2",))
    _pooled(model, images, prefix, keep="no_such_node")
    assert prefix.stored is None
