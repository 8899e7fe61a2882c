import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sklearn_craft.finetune
from sklearn_craft.finetune import (
    FINETUNE_DEFAULTS,
    check_finetune_params,
    finetune,
    fit_temperature,
    recalibrate_batchnorm,
)

from conftest import ARCHITECTURES, randomize, trainable_net


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 1, 8, 8), dtype=np.float32)
    y = X.mean(axis=(1, 2, 3)) * 4 - 2
    return X, y


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_check_finetune_params_fills_defaults_and_keeps_values():
    params = check_finetune_params({"epochs": 3, "optimizer": "sgd"})
    assert set(params) == set(FINETUNE_DEFAULTS)
    assert params["epochs"] == 3 and params["optimizer"] == "sgd"
    assert params["lr"] == FINETUNE_DEFAULTS["lr"]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"epoch": 3}, "unknown keys \\['epoch'\\]"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"early_stopping": 2}, "early_stopping.*validation_fraction"),
        ({"monitor": "auc"}, "monitor"),
        ({"monitor": "accuracy", "validation_fraction": 0.2}, "monitor.*needs.*early_stopping"),
    ],
)
def test_check_finetune_params_rejects_bad_values(params, match):
    with pytest.raises(ValueError, match=match):
        check_finetune_params(params)


def test_check_finetune_params_rejects_non_dict():
    with pytest.raises(TypeError, match="finetune_params must be None or a dict"):
        check_finetune_params([("epochs", 3)])


def test_same_random_state_gives_same_weights_and_other_seeds_differ():
    X, y = _data()
    runs = []
    for seed in (0, 0, 1):
        model = trainable_net(dropout=0.3)
        finetune(model, X, y, loss="mse", epochs=3, batch_size=8, validation_fraction=0.2, random_state=seed)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_dataset_workers_and_dataloaders_give_the_same_weights_with_dropout():
    X, y = _data()
    tensors = torch.utils.data.TensorDataset(torch.as_tensor(X))
    inputs = [(X, 0), (tensors, 1), (torch.utils.data.DataLoader(tensors, batch_size=5, num_workers=1), 0)]
    runs = []
    for X_in, num_workers in inputs:
        model = trainable_net(dropout=0.3)
        options = dict(epochs=1, batch_size=8, random_state=0, num_workers=num_workers)
        finetune(model, X_in, y, loss="mse", **options)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_global_torch_seed_is_untouched():
    X, y = _data()
    state = torch.random.get_rng_state()
    finetune(trainable_net(dropout=0.3), X, y, loss="mse", epochs=2, random_state=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_training_lowers_the_loss_and_leaves_eval_mode():
    X, y = _data()
    model = trainable_net().train()
    history = finetune(model, X, y, loss="mse", epochs=30, lr=0.01, batch_size=16, random_state=0)
    assert list(history["epoch"]) == list(range(1, 31))
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert history["val_loss"].isna().all()
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize(
    "loss, make_target, n_outputs",
    [
        ("cross_entropy", lambda y: (y > 0).astype(int) + (y > 1).astype(int), 3),
        ("bce", lambda y: (y > 0).astype(np.float32), 1),
        ("bce", lambda y: np.stack([y > 0, y > 1], axis=1).astype(np.float32), 2),
        ("mse", lambda y: np.stack([y, -y], axis=1), 2),
    ],
)
def test_each_loss_trains(loss, make_target, n_outputs):
    X, y = _data()
    model = trainable_net(n_outputs)
    before = _weights(model)
    history = finetune(model, X, make_target(y), loss=loss, epochs=5, lr=0.01, random_state=0)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert not any(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_early_stopping_stops_and_restores_the_best_weights():
    # Identical samples: the validation loss is the loss on every sample, so the restored
    # weights must give exactly the lowest validation loss of the history.
    X = np.repeat(np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32), 40, axis=0)
    y = np.full(40, 3.0)
    model = trainable_net()
    history = finetune(
        model,
        X,
        y,
        loss="mse",
        epochs=50,
        lr=5.0,
        optimizer="sgd",
        validation_fraction=0.25,
        early_stopping=2,
        random_state=0,
    )
    best = history["val_loss"].idxmin()
    assert len(history) == best + 1 + 2 < 50
    # kept marks the restored epoch, and only it.
    assert history.index[history["kept"]].tolist() == [best]
    with torch.no_grad():
        final = nn.functional.mse_loss(model(torch.as_tensor(X[:1]))[:, 0], torch.tensor([3.0])).item()
    assert final == pytest.approx(history["val_loss"].min(), rel=1e-5)


def _three_classes(n=90, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 1, 8, 8), dtype=np.float32)
    brightness = X.mean(axis=(1, 2, 3)) + 0.05 * rng.standard_normal(n)
    return X, np.digitize(brightness, np.quantile(brightness, [1 / 3, 2 / 3]))


def _validation_accuracy(model, X, y, validation_fraction, random_state):
    val_idx = sklearn_craft.finetune._validation_split(len(X), validation_fraction, random_state)[2].numpy()
    with torch.no_grad():
        predicted = model(torch.as_tensor(X[val_idx])).argmax(dim=1).numpy()
    return np.mean(predicted == y[val_idx])


def test_monitor_accuracy_restores_the_epoch_of_highest_validation_accuracy_not_lowest_loss():
    X, y = _three_classes()
    settings = dict(loss="cross_entropy", epochs=10, lr=0.05, validation_fraction=0.3, early_stopping=10, random_state=2)
    by_accuracy, by_loss = trainable_net(n_outputs=3, seed=2), trainable_net(n_outputs=3, seed=2)
    history = finetune(by_accuracy, X, y, monitor="accuracy", **settings)
    # The two quantities disagree on this run, so the test tells the monitors apart.
    assert history["val_loss"].idxmin() != history["val_accuracy"].idxmax()
    assert _validation_accuracy(by_accuracy, X, y, 0.3, 2) == pytest.approx(history["val_accuracy"].max())
    assert history.index[history["kept"]].tolist() == [history["val_accuracy"].idxmax()]
    loss_history = finetune(by_loss, X, y, **settings)
    pd.testing.assert_frame_equal(loss_history.drop(columns="kept"), history.drop(columns="kept"))
    assert loss_history.index[loss_history["kept"]].tolist() == [loss_history["val_loss"].idxmin()]
    best_by_loss = loss_history.loc[loss_history["val_loss"].idxmin(), "val_accuracy"]
    assert _validation_accuracy(by_loss, X, y, 0.3, 2) == pytest.approx(best_by_loss) != history["val_accuracy"].max()
    untrained = trainable_net(n_outputs=3, seed=2)
    assert history.loc[0, "val_accuracy"] == pytest.approx(_validation_accuracy(untrained, X, y, 0.3, 2))


def test_val_accuracy_of_bce_is_the_weighted_mean_over_outputs():
    X, y = _three_classes()
    labels = np.stack([y == 0, y == 2], axis=1).astype(np.float32)
    weights = np.random.default_rng(1).integers(1, 4, len(X)).astype(float)
    model = trainable_net(n_outputs=2, seed=0)
    with torch.no_grad():
        right = ((model(torch.as_tensor(X)) > 0).numpy() == labels.astype(bool)).mean(axis=1)
    history = finetune(model, X, labels, loss="bce", epochs=1, validation_fraction=0.3, sample_weight=weights, random_state=0)
    val_idx = sklearn_craft.finetune._validation_split(len(X), 0.3, 0)[2].numpy()
    assert history.loc[0, "val_accuracy"] == pytest.approx(np.average(right[val_idx], weights=weights[val_idx]))
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy", "kept"]
    # Without early stopping the model ends with the last epoch's weights.
    assert history["kept"].tolist() == [False, True]


def test_monitor_accuracy_needs_a_classification_loss():
    X, y = _data()
    with pytest.raises(ValueError, match="monitor='accuracy' needs loss in"):
        finetune(trainable_net(), X, y, loss="mse", validation_fraction=0.2, early_stopping=2, monitor="accuracy")


def test_frozen_parameters_stay_frozen():
    X, y = _data()
    model = trainable_net()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    finetune(model, X, y, loss="mse", epochs=2, random_state=0)
    assert torch.equal(model[0].weight, frozen)
    assert not model[0].weight.requires_grad


def test_errors():
    X, y = _data()
    frozen = trainable_net().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        finetune(frozen, X, y, loss="mse", epochs=1)
    with pytest.raises(ValueError, match="one row per image \\(60\\), got 59"):
        finetune(trainable_net(), X, y[:59], loss="mse", epochs=1)
    with pytest.raises(ValueError, match="loss must be one of"):
        finetune(trainable_net(), X, y, loss="hinge", epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        finetune(trainable_net(), X, y, loss="mse", epochs=0)
    with pytest.raises(ValueError, match="leaves no training sample"):
        finetune(trainable_net(), X[:1], y[:1], loss="mse", epochs=1, validation_fraction=0.5)


def test_early_stopping_keeps_the_initial_weights_when_no_epoch_improves():
    X, y = _data()
    model = trainable_net()
    before = _weights(model)
    # A huge SGD step makes every epoch worse than the start on the validation samples.
    history = finetune(
        model, X, y, loss="mse", epochs=4, lr=50.0, optimizer="sgd", validation_fraction=0.25, early_stopping=2, random_state=0
    )
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["kept"].tolist() == [True, False, False]
    assert np.isnan(history["train_loss"].iloc[0])
    assert (history["val_loss"].iloc[1:] > history["val_loss"].iloc[0]).all()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_recalibrate_batchnorm_estimates_the_statistics_of_all_images_and_restores_the_modes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.Dropout(0.5), nn.ReLU()).eval()
    net[2].train()  # a module left in train mode must stay so, and must not run as such
    X = 2.0 + 3.0 * torch.randn(48, 1, 8, 8)
    recalibrate_batchnorm(net, X, batch_size=16)

    with torch.no_grad():
        responses = net[0](X).transpose(0, 1).reshape(3, -1)
    expected_mean = responses.mean(1)
    expected_var = responses.var(1, unbiased=True)
    torch.testing.assert_close(net[1].running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert net[1].momentum == 0.3
    assert [module.training for module in net] == [False, False, True, False]
    assert int(net[1].num_batches_tracked) == 3


@pytest.mark.parametrize(
    "body", [lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), lambda: nn.Sequential(nn.Flatten(2), nn.Conv1d(1, 5, 3))]
)
def test_recalibrate_batchnorm_1d_on_features_and_sequences_equals_one_batch_of_everything(body):
    # BatchNorm1d reads (N, C) features or (N, C, L) sequences: the moments reduce over every axis but C.
    torch.manual_seed(0)
    net = nn.Sequential(body(), nn.BatchNorm1d(5))
    reference = copy.deepcopy(net).train()
    reference[1].momentum = None
    X = 1.0 + 2.0 * torch.rand(40, 1, 8, 8)
    recalibrate_batchnorm(net.eval(), X, batch_size=6)
    with torch.no_grad():
        reference(X)
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(net[1].running_var, reference[1].running_var, rtol=1e-5, atol=1e-7)


def test_recalibrate_batchnorm_leaves_a_network_without_batchnorm_alone():
    model = trainable_net()
    before = _weights(model)
    assert recalibrate_batchnorm(model, _data()[0]) is model
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


class _AddsBetweenChildren(nn.Module):
    """Runs the children of ``body`` itself, adding 1 after each: ``body``'s own forward never runs."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        for module in self.body:
            x = module(x) + 1
        return x


class _AddOneInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1)


class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def _conv_bn(channels):
    return [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]


def _resume_case(name):
    """A network whose BatchNorm layers sit in plain Sequentials or a graph, or one where resuming would be wrong."""
    torch.manual_seed(0)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name].build()
    if name.endswith("_graph") and name.removesuffix("_graph") in ARCHITECTURES:
        # As the pruner's working networks are: a graph whose nodes call the layers.
        return torch.fx.symbolic_trace(ARCHITECTURES[name.removesuffix("_graph")].build())
    if name == "in_place_first":
        return nn.Sequential(
            nn.Sequential(_AddOneInPlace(), *_conv_bn(3), nn.ReLU(inplace=True), *_conv_bn(3)),
            nn.Sequential(nn.ReLU(inplace=True), *_conv_bn(3)),
        )
    if name == "residual":
        return nn.Sequential(*_conv_bn(3), _Residual(*_conv_bn(3), nn.ReLU(), *_conv_bn(3)), *_conv_bn(3))
    if name == "manual":
        return _AddsBetweenChildren(nn.Sequential(*_conv_bn(3), *_conv_bn(3)))
    if name == "bn_called_twice_graph":
        twice = nn.Sequential(*_conv_bn(3), nn.ReLU())
        return torch.fx.symbolic_trace(nn.Sequential(twice, *_conv_bn(3), twice))
    raise ValueError(f"no resume case named {name!r}")


@pytest.mark.parametrize(
    "name",
    [
        "in_place_first", "residual", "manual", "vgg16_bn", "resnet18", "mobilenet_v2",
        "vgg16_bn_graph", "resnet18_graph", "mobilenet_v2_graph", "bn_called_twice_graph",
    ],
)
def test_recalibrate_batchnorm_resumed_passes_equal_passes_from_the_images(name, monkeypatch):
    model = randomize(_resume_case(name))
    architecture = name.removesuffix("_graph")
    shape = ARCHITECTURES[architecture].input_shape if architecture in ARCHITECTURES else (3, 6, 6)
    X = 1.0 + torch.randn(20, *shape, generator=torch.Generator().manual_seed(1))
    resumed = recalibrate_batchnorm(randomize(_resume_case(name)), X, batch_size=8)
    # Room for the inputs of two batches of 8 of the 20 images: nothing is kept (the first batch
    # shows that all would not fit), and passes from the images take over.
    monkeypatch.setattr(sklearn_craft.finetune, "_RESUME_BYTES", 2 * 8 * 4 * int(np.prod(shape)))
    over_budget = recalibrate_batchnorm(randomize(_resume_case(name)), X, batch_size=8)
    # No room for stored activations: every layer is estimated on a pass from the images.
    monkeypatch.setattr(sklearn_craft.finetune, "_RESUME_BYTES", 0)
    from_images = recalibrate_batchnorm(model, X, batch_size=8)
    expected = from_images.state_dict()
    for network in (resumed, over_budget):
        assert all(torch.equal(value, expected[key]) for key, value in network.state_dict().items())


def test_store_keeps_all_batches_in_one_block_per_value_or_none(monkeypatch):
    monkeypatch.setattr(sklearn_craft.finetune, "_RESUME_BYTES", 400)
    x = torch.arange(100.0).reshape(20, 5)  # 20 bytes per image, 400 bytes for all 20
    weight = torch.ones(3)
    store = sklearn_craft.finetune._Store(20)
    for start, stop in [(0, 8), (8, 16), (16, 20)]:
        store.add({"x": x[start:stop] * 1}, stop - start, shared={"weight": weight})
    # Every batch a view of one block holding all the images (one allocation), the shared tensor as it is.
    block = store.blocks.blocks["x"]
    assert block.shape == (20, 5) and torch.equal(block, x) and store.blocks.nbytes == 400
    assert all(batch["x"].untyped_storage().data_ptr() == block.untyped_storage().data_ptr() for batch in store.batches)
    assert all(batch["weight"] is weight for batch in store.batches)
    # Resuming from 400 bytes held until the pass ends: the new values would exceed the budget, so
    # none is kept, from the first batch on.
    store = sklearn_craft.finetune._Store(20, old_bytes=400)
    store.add({"x": x[:8]}, 8)
    assert store.batches is None and store.blocks is None
    # One byte too many per image: not even the first batch, which fits, is kept.
    store = sklearn_craft.finetune._Store(20)
    store.add({"x": torch.zeros(8, 5, dtype=torch.float64)[:, :3]}, 8)  # 24 bytes per image
    assert store.batches is None


@pytest.mark.parametrize("graph", [False, True])
def test_recalibrate_batchnorm_resumes_again_after_a_layer_over_the_budget(graph, monkeypatch):
    torch.manual_seed(0)
    # The first BatchNorm's input (8 x 16 x 16 per image) does not fit the budget; after the
    # stride-4 convolution, the inputs of the next three (2 x 4 x 4) do.
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 4, stride=4),
        nn.BatchNorm2d(2), nn.ReLU(), *_conv_bn(2), nn.ReLU(), *_conv_bn(2),
    )
    net = randomize(torch.fx.symbolic_trace(net) if graph else net).eval()
    X = 1.0 + torch.randn(20, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    resumed, calls = copy.deepcopy(net), []
    resumed.get_submodule("0").register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    monkeypatch.setattr(sklearn_craft.finetune, "_RESUME_BYTES", 20 * 1024)
    resumed = recalibrate_batchnorm(resumed, X, batch_size=8)
    # The example runs (see the next test), then two passes from the images: the first layer's
    # and the second's, which keeps its values for the last two.
    assert calls == [1] * (1 if graph else 2) + [8, 8, 4] * 2
    monkeypatch.setattr(sklearn_craft.finetune, "_RESUME_BYTES", 0)
    expected = recalibrate_batchnorm(net, X, batch_size=8).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())


@pytest.mark.parametrize("graph", [False, True])
def test_recalibrate_batchnorm_runs_the_first_layer_once_per_batch(graph):
    torch.manual_seed(0)
    net = nn.Sequential(*_conv_bn(2), nn.ReLU(), *_conv_bn(2), nn.ReLU(), *_conv_bn(2)).eval()
    net = torch.fx.symbolic_trace(net) if graph else net
    calls = []
    net.get_submodule("0").register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    recalibrate_batchnorm(net, torch.randn(20, 2, 5, 5), batch_size=8)
    # One example for the order of the layers (and one for the Sequential's resume points), then
    # once per batch of 8, 8, 4 (a pass from the images per BatchNorm layer: three times per batch).
    assert calls == [1, 8, 8, 4] if graph else [1, 1, 8, 8, 4]


def _labels_at_temperature(loss, temperature, n=20000, seed=0):
    """Logits, and labels drawn from the probabilities of ``logits / temperature``."""
    rng = np.random.default_rng(seed)
    if loss == "bce":
        logits = rng.normal(size=(n, 2))
        return logits, (rng.random((n, 2)) < 1 / (1 + np.exp(-logits / temperature))).astype(float)
    logits = rng.normal(size=(n, 4))
    p = np.exp(logits / temperature)
    p /= p.sum(axis=1, keepdims=True)
    return logits, (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)


@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(loss, temperature):
    logits, y = _labels_at_temperature(loss, temperature)
    fitted = fit_temperature(logits, y, loss=loss)
    assert fitted == pytest.approx(temperature, rel=0.08)
    # It is the minimiser: the loss is higher on either side of it.
    criterion = sklearn_craft.finetune._LOSSES[loss]()
    target = torch.as_tensor(y, dtype=torch.long if loss == "cross_entropy" else torch.float64)
    value = {t: criterion(torch.as_tensor(logits) / t, target).item() for t in (fitted / 1.05, fitted, fitted * 1.05)}
    assert value[fitted] < value[fitted / 1.05] and value[fitted] < value[fitted * 1.05]


def test_fit_temperature_weights_count_as_repeated_samples():
    logits, y = _labels_at_temperature("cross_entropy", 0.5, n=600)
    weights = np.random.default_rng(1).integers(1, 4, size=600)
    repeated = fit_temperature(np.repeat(logits, weights, axis=0), np.repeat(y, weights), loss="cross_entropy")
    assert fit_temperature(logits, y, loss="cross_entropy", sample_weight=weights) == pytest.approx(repeated, rel=1e-5)
    assert fit_temperature(logits, y, loss="cross_entropy") != pytest.approx(repeated, rel=1e-3)


def test_fit_temperature_of_one_output_and_separated_classes():
    logits, y = _labels_at_temperature("bce", 2.0)
    assert fit_temperature(logits[:, 0], y[:, 0], loss="bce") == pytest.approx(
        fit_temperature(logits[:, :1], y[:, :1], loss="bce")
    )
    # Perfectly separated classes: the loss falls as the temperature falls, down to the bound.
    assert fit_temperature([-1.0, -0.5, 0.5, 2.0], [0, 0, 1, 1], loss="bce") == pytest.approx(1e-2, rel=1e-3)


@pytest.mark.parametrize(
    "logits, y, loss, match",
    [
        ([[0.1], [0.2]], [0, 1], "mse", "loss must be one of \\['cross_entropy', 'bce'\\], got 'mse'"),
        ([[0.1], [np.nan]], [0, 1], "bce", "logits must be a finite"),
        (np.zeros((2, 2, 2)), [0, 1], "bce", "logits must be a finite 1-D or 2-D array, got shape \\(2, 2, 2\\)"),
        ([[0.1], [0.2]], [0, 1, 1], "bce", "y must have one row per row of logits \\(2\\), got 3"),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, y, loss, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, y, loss=loss)
