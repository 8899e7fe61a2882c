"""Unusual but legitimate use gives a correct result or a clear error (issue 12, "Robustness")."""

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sklearn_craft.export import save_model
from sklearn_craft.finetune import finetune, recalibrate_batchnorm
from sklearn_craft.images import iter_batches
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.profiling import compare_models, count_flops, measure_latency
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.relationships import task_relationship_matrix
from sklearn_craft.surgery import coupled_groups, prune_channels, truncate


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


# ---------------------------------------------------------------- divergence and non-finite input


def _regression_data(n=40, size=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 3, size, size), dtype=np.float32)
    return X, X[:, 0].mean(axis=(1, 2)) - X[:, 1].mean(axis=(1, 2))


def _relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU())


def test_diverging_fine_tuning_is_an_error_naming_lr():
    X, y = _regression_data()
    net = nn.Sequential(_relu_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"fine-tuning diverged: .* became NaN or infinite .* lr=10000000000.0"):
        finetune(net, X, y, loss="mse", lr=1e10, epochs=3, random_state=0)
    pruner = CraftPruner(_relu_net(), gamma=0.1, finetune_params={"lr": 1e10, "epochs": 3}, random_state=0)
    with pytest.raises(ValueError, match=r"fine-tuning diverged: .* lr=10000000000.0"):
        pruner.fit(X, y)
    assert not hasattr(pruner, "pruned_model_")


def test_nan_from_preprocess_is_reported_as_such():
    X, y = _regression_data()

    def broken(batch):
        return (batch - batch.mean()) / torch.zeros(())  # a zero standard deviation

    message = r"preprocess returned NaN or infinity for the batch of images 0\.\.\d+"
    with pytest.raises(ValueError, match=message):
        ActivationPooler(_relu_net(), preprocess=broken).fit(X).transform(X)
    with pytest.raises(ValueError, match=message):
        CraftPruner(_relu_net(), gamma=0.1, preprocess=broken, random_state=0).fit(X, y)
    with pytest.raises(TypeError, match="preprocess must return a torch.Tensor, got ndarray"):
        ActivationPooler(_relu_net(), preprocess=lambda batch: batch.numpy()).fit(X)


def test_pixels_beyond_float32_range_are_reported_as_such():
    X, y = _regression_data()
    X = X.astype(np.float64)
    X[5, 0, 2, 2] = 1e39
    message = r"X holds pixel values beyond the float32 range \(largest magnitude 1e\+39"
    with pytest.raises(ValueError, match=message):
        ActivationPooler(_relu_net()).fit(X).transform(X)
    with pytest.raises(ValueError, match=message):
        CraftPruner(_relu_net(), gamma=0.1, random_state=0).fit(X, y)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, index):
            return X[index]

    with pytest.raises(ValueError, match=r"X\[5\] holds pixel values beyond the float32 range"):
        ActivationPooler(_relu_net()).fit(Items()).transform(Items())


# ---------------------------------------------------------------- BatchNorm re-estimation


def _deep_bn_net(seed=0):
    """Three BatchNorm layers in a chain, with a residual addition and dropout."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
            self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3))
            self.last = nn.Sequential(nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            x = self.stem(x)
            return self.last(x + self.branch(x))

    return Net()


def _bn_statistics(model):
    return [
        (module.running_mean.clone(), module.running_var.clone())
        for module in model.modules()
        if isinstance(module, nn.BatchNorm2d)
    ]


def test_batchnorm_statistics_do_not_depend_on_batch_size_and_equal_one_batch_of_everything():
    X, _ = _regression_data(n=50)
    X = 3 * X + 1
    small, large = _deep_bn_net(), _deep_bn_net()
    recalibrate_batchnorm(small, X, batch_size=7)
    recalibrate_batchnorm(large, X, batch_size=64)
    # What BatchNorm stores after one batch of all images in train mode (momentum=None).
    reference = _deep_bn_net()
    reference.train()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
        elif isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        reference(torch.from_numpy(X))
    for ours, theirs, expected in zip(_bn_statistics(small), _bn_statistics(large), _bn_statistics(reference)):
        for a, b, c in zip(ours, theirs, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a, c, rtol=2e-5, atol=1e-6)
    assert all(module.training for module in small.modules())  # flags restored


@pytest.mark.slow
def test_pruner_predictions_do_not_depend_on_batch_size():
    X, y = _regression_data(n=60)
    predictions = []
    for batch_size in (7, 64):
        pruner = CraftPruner(_deep_bn_net(), gamma=0.2, batch_size=batch_size, random_state=0).fit(X, y)
        assert any(len(kept) < 8 for kept in pruner.keep_.values())  # surgery ran, hence re-estimation
        predictions.append(pruner.predict(X))
    np.testing.assert_allclose(predictions[0], predictions[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pooling stops after the last pooled layer


def _classifier_net(image_size=16):
    """Convolutions, then a Linear layer that only accepts images of ``image_size`` pixels."""
    torch.manual_seed(0)
    width = image_size - 4
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * width * width, 2)
    )


def test_pooling_stops_after_the_last_pooled_layer_in_fit_too():
    images = np.random.default_rng(0).random((5, 3, 24, 24), dtype=np.float32)
    model = _classifier_net(16)  # its Linear layer cannot take 24-pixel images
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        model(torch.from_numpy(images))
    pooler = ActivationPooler(model).fit(images)
    assert pooler.layers_ == ["0", "2"]
    expected = ActivationPooler(model[:4]).fit(images).transform(images)
    np.testing.assert_array_equal(pooler.transform(images), expected)


# ---------------------------------------------------------------- clear errors naming the argument

_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch build can use CUDA")


@_NO_CUDA
@pytest.mark.parametrize(
    "call",
    [
        lambda X, y: ActivationPooler(_relu_net(), device="cuda").fit(X),
        lambda X, y: CraftPruner(_relu_net(), device="cuda").fit(X, y),
        lambda X, y: finetune(_classifier_net(8), X, np.zeros((len(X), 2)), loss="mse", device="cuda"),
        lambda X, y: recalibrate_batchnorm(_deep_bn_net(), X, device="cuda:0"),
        lambda X, y: next(iter_batches(X, 4, device="cuda")),
        lambda X, y: task_relationship_matrix({"net": _relu_net()}, X, pd.DataFrame({"t": y}), device="cuda"),
    ],
    ids=["ActivationPooler", "CraftPruner", "finetune", "recalibrate_batchnorm", "iter_batches", "relationships"],
)
def test_cuda_on_a_cpu_build_is_a_clear_error(call):
    X, y = _regression_data(n=20)
    with pytest.raises(
        ValueError, match=r"device='cuda(:0)?' is not available in this torch build .* use device='cpu'"
    ):
        call(X, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float64_and_float16_models_are_pooled(dtype):
    X, y = _regression_data(n=12)
    expected = ActivationPooler(_relu_net()).fit(X).transform(X)
    features = ActivationPooler(_relu_net().to(dtype)).fit(X).transform(X)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5 if dtype == torch.float64 else 2e-2, atol=1e-3)
    model = nn.Sequential(_relu_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)).double()
    history = finetune(model, X, y, loss="mse", epochs=1, random_state=0)
    assert np.isfinite(history["train_loss"]).all()
    with pytest.raises(
        ValueError, match=r"model must have float32 parameters .* got torch\.float64: pass model\.float\(\)"
    ):
        CraftPruner(_relu_net().double()).fit(X, y)


def test_a_model_without_values_is_a_clear_error():
    X, y = _regression_data(n=12)
    with pytest.raises(ValueError, match="model has parameters or buffers on the meta device"):
        ActivationPooler(_relu_net().to("meta")).fit(X)
    with pytest.raises(ValueError, match="model has parameters or buffers on the meta device"):
        CraftPruner(_relu_net().to("meta")).fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_the_gpu_is_copied_to_the_cpu_device():
    X, y = _regression_data(n=40)
    expected = ActivationPooler(_relu_net()).fit(X).transform(X)
    model = _relu_net().cuda()
    np.testing.assert_allclose(
        ActivationPooler(model, device="cpu").fit(X).transform(X), expected, rtol=1e-4, atol=1e-5
    )
    pruner = CraftPruner(model, gamma=0.1, device="cpu", random_state=0).fit(X, y)
    assert next(pruner.pruned_model_.parameters()).device.type == "cpu"
    assert next(model.parameters()).device.type == "cuda"
    reference = CraftPruner(_relu_net(), gamma=0.1, random_state=0).fit(X, y)
    np.testing.assert_allclose(pruner.predict(X), reference.predict(X), rtol=1e-3, atol=1e-4)


def test_an_example_input_of_the_wrong_shape_is_a_clear_error(tmp_path):
    model = _classifier_net(16)
    wrong = torch.zeros(1, 3, 15, 15)
    message = r"model cannot run on example_input \(a batch of shape \(1, 3, 15, 15\)\): mat1 and mat2 shapes"
    with pytest.raises(ValueError, match=message):
        prune_channels(model, {"0": [0, 1]}, wrong)
    with pytest.raises(ValueError, match=message):
        truncate(model, "2", wrong)
    with pytest.raises(ValueError, match=message):
        coupled_groups(model, wrong)
    with pytest.raises(ValueError, match=message):
        save_model(model, tmp_path / "model.pt2", example_input=wrong)


@pytest.mark.parametrize(
    "call",
    [
        lambda model, shape, path: count_flops(model, shape),
        lambda model, shape, path: measure_latency(model, shape, repeats=1, warmup=0),
        lambda model, shape, path: compare_models(model, model, shape, latency=False),
        lambda model, shape, path: save_model(model, path / "model.pt2", input_shape=shape),
    ],
    ids=["count_flops", "measure_latency", "compare_models", "save_model"],
)
def test_an_input_shape_with_a_batch_axis_is_a_clear_error(tmp_path, call):
    with pytest.raises(ValueError, match=r"input_shape has an axis too many \(the shape of one example must not"):
        call(_classifier_net(16), (1, 3, 16, 16), tmp_path)


def test_save_model_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"path must be in an existing folder, .*/missing' does not exist"):
        save_model(_classifier_net(16), tmp_path / "missing" / "model.pt2", input_shape=(3, 16, 16))
