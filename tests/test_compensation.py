"""Least-squares compensation of the readers of removed channels (sklearn_craft.compensation)."""

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_craft import CraftPruner
from sklearn_craft.compensation import compensate_readers
from sklearn_craft.surgery import prune_channels


def _linear_pair(reader_kernel=1, reader_bias=True):
    """A conv whose 6 responses are affine in 3 inputs, read by a dense conv (no padding)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, reader_kernel, bias=reader_bias))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_removed_channels_that_are_affine_in_the_kept_ones_are_carried_exactly(kernel, bias):
    model = _linear_pair(kernel, bias)
    X = torch.rand(24, 3, 7, 7)
    kept = {"0": [1, 3, 5]}
    compensated = compensate_readers(model, X, kept, X[:1], ridge=0.0)
    pruned = prune_channels(compensated, kept, X[:1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), model(X), atol=1e-4, rtol=1e-4)
        plain = prune_channels(model, kept, X[:1])
        assert (plain(X) - model(X)).abs().max() > 1e-2  # without compensation the output changes
    # The constant part needs a bias: a reader without one gets it.
    assert pruned[1].bias is not None
    assert (model[1].bias is None) == (not bias)
    assert model[1].in_channels == 6 and compensated is not model


def test_a_reader_behind_batchnorm_activation_and_depthwise_gets_the_least_squares_weights():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 5, 1, bias=False),
    ).eval()
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    X = torch.rand(20, 3, 6, 6)
    kept = {"0": [0, 2, 3, 6]}
    compensated = compensate_readers(model, X, kept, X[:1], ridge=0.0)
    with torch.no_grad():
        inputs = model[:6](X).transpose(0, 1).reshape(8, -1).double().T.numpy()  # pixels x channels
        outputs = model(X).transpose(0, 1).reshape(5, -1).double().T.numpy()
    # Least squares of the original outputs on the kept channels plus a constant.
    design = np.hstack([inputs[:, kept["0"]], np.ones((len(inputs), 1))])
    solution = np.linalg.lstsq(design, outputs, rcond=None)[0]
    reader = compensated[6]
    np.testing.assert_allclose(reader.weight.detach()[:, kept["0"], 0, 0].T.numpy(), solution[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reader.bias.detach().numpy(), solution[-1], rtol=1e-4, atol=1e-5)
    # The depthwise convolution follows its input: it is looked through, not compensated.
    torch.testing.assert_close(compensated[3].weight, model[3].weight)
    pruned = prune_channels(compensated, kept, X[:1])
    plain = prune_channels(model, kept, X[:1])
    with torch.no_grad():
        error = ((pruned(X) - model(X)) ** 2).mean()
        assert error < ((plain(X) - model(X)) ** 2).mean()


def test_nothing_removed_leaves_a_copy_unchanged_and_the_model_is_never_modified():
    model = _linear_pair()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    X = torch.rand(8, 3, 4, 4)
    same = compensate_readers(model, X, {"0": list(range(6))}, X[:1])
    assert same is not model
    for name, value in same.state_dict().items():
        torch.testing.assert_close(value, before[name])
    compensate_readers(model, X, {"0": [0, 1, 2]}, X[:1])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
        ({"kept": [0, 1]}, TypeError, "kept must be a dict"),
        ({"ridge": -1.0}, ValueError, "ridge must be a non-negative float"),
        ({"device": "gpu"}, ValueError, "device"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    X = torch.rand(4, 3, 4, 4)
    arguments = {"model": _linear_pair(), "X": X, "kept": {"0": [0, 1]}, "example_input": X[:1], **kwargs}
    with pytest.raises(error, match=match):
        compensate_readers(**arguments)


def _task(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 3, 12, 12), dtype=np.float32)
    y = X[:, 0, :6].mean(axis=(1, 2)) - X[:, 2, 6:].mean(axis=(1, 2)) + 0.01 * rng.normal(size=n)
    return X, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.ReLU(),
    ).eval()


@pytest.mark.parametrize("params", [{}, {"filter_rule": "l1_norm", "flops_target": 0.4927}])
def test_pruner_compensation_changes_the_readers_not_the_selection(params):
    X, y = _task()
    options = dict(gamma=0.05, head_layer="6", selector_params={"alphas": 20}, random_state=0, **params)
    plain = CraftPruner(_net(), **options).fit(X, y)
    compensated = CraftPruner(_net(), compensate=True, **options).fit(X, y)
    assert compensated.selected_.keys() == plain.selected_.keys() and compensated.keep_ == plain.keep_
    for layer, indices in plain.selected_.items():
        np.testing.assert_array_equal(compensated.selected_[layer], indices)
    assert compensated.report_.loc["flops", "pruned"] == plain.report_.loc["flops", "pruned"]
    assert any(len(k) < 12 for k in plain.keep_.values())
    # The reader of the first cut layer was refit, so the pruned networks differ.
    reader_plain, reader_comp = (p.pruned_model_.get_submodule("3").weight for p in (plain, compensated))
    assert reader_plain.shape == reader_comp.shape and not torch.equal(reader_plain, reader_comp)
    assert np.isfinite(compensated.predict(X)).all()


def test_pruner_compensation_in_sequential_mode_and_the_refused_combination():
    X, y = _task()
    options = dict(gamma=0.05, head_layer="6", selector_params={"alphas": 20}, random_state=0)
    pruner = CraftPruner(_net(), selection="sequential", compensate=True, **options).fit(X, y)
    assert np.isfinite(pruner.score_before_finetune(X, y))
    with pytest.raises(ValueError, match="compensate=True cannot be combined with scale_filters=True"):
        CraftPruner(_net(), compensate=True, scale_filters=True, **options).fit(X, y)
    assert not hasattr(CraftPruner(_net(), compensate=True, scale_filters=True), "pruned_model_")
