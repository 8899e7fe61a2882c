import doctest
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

import sklearn_craft.pooling
from sklearn_craft.inspection import find_responses
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.surgery import truncate

from conftest import (
    ARCHITECTURES,
    assert_expected_failures_are_current,
    image_estimator_expected_failures,
    response_kinds_net,
    run_image_estimator_check,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pooling.rst"


def _images(n=10, size=12, channels=3, seed=0):
    """uint8 N×H×W×C images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _nchw(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


class _Counting(nn.Module):
    """Identity that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return x


class _Block(nn.Module):
    """A torchvision BasicBlock: one ``self.relu`` serves both convolutions."""

    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class _ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.block = _Block()

    def forward(self, x):
        return self.block(self.act(self.bn(self.stem(x))))


class _Untraceable(_ResNetLike):
    def forward(self, x):
        if x.sum() > -1:  # data-dependent control flow: torch.fx cannot trace it
            x = self.act(self.bn(self.stem(x)))
        return self.block(x)


# ---------------------------------------------------------------- what is pooled


def test_pooled_values_equal_channel_means_of_the_full_maps():
    model = response_kinds_net().train()
    images = _images()
    pooler = ActivationPooler(model, batch_size=3).fit(images)
    features = pooler.transform(images)

    x = _nchw(images)
    with torch.no_grad():
        model.eval()
        relu = model[2](model[1](model[0](x)))  # Conv -> BN -> ReLU: the activation
        bn = model[4](model[3](relu))  # Conv -> BN without activation: the BatchNorm
        conv = model[5](bn)  # Conv alone: the conv output
        model.train()
    expected = torch.cat([maps.mean(dim=(2, 3)) for maps in (relu, bn, conv)], dim=1)

    assert pooler.responses_ == {"0": "2", "3": "4", "5": "5"}
    assert features.dtype == np.float32 and features.shape == (10, 6 + 5 + 4)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_pools_every_convolution(name):
    architecture = ARCHITECTURES[name]
    model = architecture.build()
    channels, height, width = architecture.input_shape
    images = np.random.default_rng(0).integers(0, 256, size=(3, height, width, channels), dtype=np.uint8)
    convs = {conv_name: m for conv_name, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    pooler = ActivationPooler(model).fit(images)
    assert pooler.layers_ == list(convs)
    assert pooler.n_channels_ == {conv_name: conv.out_channels for conv_name, conv in convs.items()}
    assert pooler.n_features_out_ == sum(conv.out_channels for conv in convs.values())
    features = pooler.transform(images)
    assert features.shape == (3, pooler.n_features_out_) and np.isfinite(features).all()
    # The first and the last layer's columns are the channel means of the network cut at their response.
    x = _nchw(images)
    offsets = np.cumsum([0, *pooler.n_channels_.values()])
    for index in (0, len(convs) - 1):
        layer = pooler.layers_[index]
        with torch.no_grad():
            expected = truncate(model, layer, x[:1])(x).mean(dim=(2, 3))
        np.testing.assert_allclose(features[:, offsets[index] : offsets[index + 1]], expected, rtol=1e-5, atol=1e-6)


def test_fitted_attributes():
    pooler = ActivationPooler(response_kinds_net(), layers=["5", "0"]).fit(_images(n=2))
    assert pooler.layers_ == ["0", "5"]
    assert pooler.n_channels_ == {"0": 6, "5": 4}
    assert pooler.n_features_out_ == 10
    names = pooler.get_feature_names_out()
    assert names.tolist() == [f"0:{c}" for c in range(6)] + [f"5:{c}" for c in range(4)]


def test_layers_are_in_forward_order_not_registration_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = nn.Conv2d(3, 2, 1)
            self.first = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.last(self.first(x))

    pooler = ActivationPooler(Reversed()).fit(_images(n=2))
    assert pooler.layers_ == ["first", "last"]
    assert pooler.get_feature_names_out()[0] == "first:0"


def test_layers_as_predicate():
    pooler = ActivationPooler(response_kinds_net(), layers=lambda name, conv: conv.out_channels < 6)
    assert pooler.fit(_images(n=2)).layers_ == ["3", "5"]


def test_find_responses_shared_activation_stops_at_batchnorm():
    assert find_responses(_ResNetLike()) == {
        "stem": "act",
        "block.conv1": "block.bn1",
        "block.conv2": "block.bn2",
    }


def test_find_responses_without_fx_uses_execution_order_or_registration_order():
    model = _Untraceable()
    example = torch.rand(1, 3, 8, 8)
    assert find_responses(model, example_input=example)["block.conv1"] == "block.bn1"
    # Registration order alone cannot see that block.relu runs twice (documented limitation).
    assert find_responses(model)["block.conv1"] == "block.relu"
    pooler = ActivationPooler(model).fit(_images(n=2, size=8))
    assert pooler.responses_["block.conv1"] == "block.bn1"


def test_find_responses_follows_only_a_direct_single_consumer_chain():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.a_bn = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 1)
            self.b_bn = nn.BatchNorm2d(4)
            self.b_drop = nn.Dropout()
            self.b_relu = nn.ReLU()
            self.c = nn.Conv2d(4, 4, 1)
            self.c_relu = nn.ReLU()
            self.d = nn.Conv2d(4, 4, 1)
            self.d_act = nn.Hardswish()

        def forward(self, x):
            x = F.relu(self.a_bn(self.a(x)))  # functional activation: not a module
            x = self.b_relu(self.b_drop(self.b_bn(self.b(x))))  # dropout in between
            y = self.c(x)
            x = self.c_relu(y) + y  # the conv output has two consumers
            return self.d_act(self.d(x))

    assert find_responses(Net()) == {"a": "a_bn", "b": "b_bn", "c": "c", "d": "d_act"}
    assert find_responses(Net(), ["d", "b"]) == {"b": "b_bn", "d": "d_act"}


def test_find_responses_leaves_model_untouched():
    model = _Untraceable().train()
    find_responses(model, example_input=torch.rand(1, 3, 8, 8))
    assert all(module.training for module in model.modules())
    assert not any(module._forward_hooks for module in model.modules())


def test_forward_pass_stops_after_the_last_pooled_layer():
    counter = _Counting()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), counter, nn.Conv2d(4, 2, 3))
    pooler = ActivationPooler(model, layers=["0"], batch_size=4).fit(_images())
    counter.seen = 0
    features = pooler.transform(_images())
    assert counter.seen == 0
    with torch.no_grad():
        expected = model[1](model[0](_nchw(_images()))).mean(dim=(2, 3))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_convs_that_do_not_run_once_are_dropped_or_rejected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 1)
            self.twice = nn.Conv2d(4, 4, 1)
            self.unused = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.twice(self.twice(self.used(x)))

    images = _images(n=2)
    with pytest.warns(UserWarning, match=r"not pooling \['twice', 'unused'\]"):
        pooler = ActivationPooler(Net()).fit(images)
    assert pooler.layers_ == ["used"]
    for name in ("twice", "unused"):
        with pytest.raises(ValueError, match="must run exactly once"):
            ActivationPooler(Net(), layers=[name]).fit(images)


# ---------------------------------------------------------------- input formats


class _Pairs(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 2


def test_every_input_format_gives_identical_features():
    images = _images()
    nchw = _nchw(images)
    pooler = ActivationPooler(response_kinds_net(), batch_size=4).fit(images)
    expected = pooler.transform(images)
    for X in (
        nchw.numpy(),
        nchw,
        torch.from_numpy(images).permute(0, 3, 1, 2),
        TensorDataset(nchw),
        _Pairs(list(nchw)),
        _Pairs(list(images)),
    ):
        np.testing.assert_array_equal(pooler.transform(X), expected)


def test_preprocess_is_applied_and_may_change_channels():
    gray = _images(channels=1)
    to_rgb = lambda batch: batch.expand(-1, 3, -1, -1)  # noqa: E731
    pooler = ActivationPooler(response_kinds_net(), preprocess=to_rgb).fit(gray)
    rgb = np.repeat(gray, 3, axis=3)
    expected = ActivationPooler(response_kinds_net()).fit(rgb).transform(rgb)
    np.testing.assert_allclose(pooler.transform(gray), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((4, 3, 12), dtype=np.float32), "must be a 4-D array"),
        (np.zeros((4, 12, 12, 1), dtype=np.uint8), "has 1 channels, the model expects n_channels=3"),
        (np.zeros((4, 12, 12, 3), dtype=np.float32), "has 12 channels"),
        (np.zeros((0, 3, 12, 12), dtype=np.float32), "is empty"),
        (np.full((4, 3, 12, 12), np.nan, dtype=np.float32), "contains NaN or infinity"),
        (np.full((4, 3, 12, 12), np.inf), "contains NaN or infinity"),
    ],
)
def test_bad_input_raises_value_error_in_fit_and_transform(X, message):
    with pytest.raises(ValueError, match=message):
        ActivationPooler(response_kinds_net()).fit(X)
    fitted = ActivationPooler(response_kinds_net()).fit(_images(n=2))
    with pytest.raises(ValueError, match=message):
        fitted.transform(X)


def test_nan_in_a_dataset_is_found_during_transform():
    x = _nchw(_images())
    x[7, 0, 0, 0] = float("nan")
    pooler = ActivationPooler(response_kinds_net(), batch_size=4).fit(x[:2])
    with pytest.raises(ValueError, match=r"contains NaN or infinity \(among items \[4, 5, 6, 7\]\)"):
        pooler.transform(TensorDataset(x))


def test_bad_parameters():
    images = _images(n=2)
    with pytest.raises(TypeError, match="'model' parameter"):
        ActivationPooler("vgg16").fit(images)
    with pytest.raises(ValueError, match=r"'nope', which is not a module.*\['0', '3', '5'\]"):
        ActivationPooler(response_kinds_net(), layers=["0", "nope"]).fit(images)
    with pytest.raises(ValueError, match="must name nn.Conv2d modules, got '2', a ReLU"):
        ActivationPooler(response_kinds_net(), layers=["2"]).fit(images)
    with pytest.raises(ValueError, match="must not repeat"):
        ActivationPooler(response_kinds_net(), layers=["0", "0"]).fit(images)
    with pytest.raises(ValueError, match="selects no nn.Conv2d"):
        ActivationPooler(response_kinds_net(), layers=lambda name, module: False).fit(images)
    with pytest.raises(ValueError, match="selects no nn.Conv2d"):
        ActivationPooler(nn.Sequential(nn.Flatten(), nn.Linear(432, 2))).fit(images)
    with pytest.raises(ValueError, match="'layers' parameter"):
        ActivationPooler(response_kinds_net(), layers="dense").fit(images)
    with pytest.raises(ValueError, match="device must be a torch device"):
        ActivationPooler(response_kinds_net(), device="gpu0").fit(images)
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        ActivationPooler(response_kinds_net(), batch_size=0).fit(images)
    with pytest.raises(NotFittedError):
        ActivationPooler(response_kinds_net()).transform(images)


# ---------------------------------------------------------------- the user's model


def _snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_model_is_unchanged_by_fit_and_transform():
    model = response_kinds_net()
    model.train()
    model[4].eval()  # mixed flags must come back exactly
    flags = [module.training for module in model.modules()]
    before = _snapshot(model)
    pooler = ActivationPooler(model, batch_size=3)
    pooler.fit(_images()).transform(_images())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert [module.training for module in model.modules()] == flags
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_are_removed_when_the_forward_pass_fails():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.armed = False

        def forward(self, x):
            if self.armed:
                raise RuntimeError("broken layer")
            return x

    fails = Fails()
    model = nn.Sequential(nn.Conv2d(3, 2, 1), fails, nn.Conv2d(2, 2, 1)).train()
    pooler = ActivationPooler(model, batch_size=4).fit(_images(n=4))
    fails.armed = True
    with pytest.raises(RuntimeError, match="broken layer"):
        pooler.transform(_images(n=6))
    assert all(module.training for module in model.modules())
    assert not any(module._forward_hooks for module in model.modules())
    fails.armed = False
    assert pooler.transform(_images(n=8)).shape == (8, 4)


def test_a_pooled_layer_skipped_at_transform_time_is_an_error_not_garbage():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.skip = False

        def forward(self, x):
            return x if self.skip else self.conv(x)

    model = Branchy()
    pooler = ActivationPooler(model, batch_size=4).fit(_images(n=4))
    model.skip = True
    with pytest.raises(RuntimeError, match=r"1 pooled layer\(s\) did not run on samples 0..3"):
        pooler.transform(_images(n=6))


def test_concurrent_transforms_of_one_model_do_not_mix_batches():
    pooler = ActivationPooler(response_kinds_net(), batch_size=2).fit(_images(n=2))
    inputs = [_images(n=6, seed=seed) for seed in range(4)]
    expected = [pooler.transform(X) for X in inputs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(pooler.transform, inputs))
    for result, reference in zip(results, expected):
        np.testing.assert_array_equal(result, reference)


# ---------------------------------------------------------------- scikit-learn behaviour


def test_set_output_pandas():
    images = _images()
    pooler = ActivationPooler(response_kinds_net()).fit(images)
    expected = pooler.transform(images)
    frame = pooler.set_output(transform="pandas").transform(images)
    assert isinstance(frame, pd.DataFrame)
    assert frame.columns.tolist() == pooler.get_feature_names_out().tolist()
    np.testing.assert_array_equal(frame.to_numpy(), expected)
    assert isinstance(pooler.fit_transform(images), pd.DataFrame)


def test_features_do_not_depend_on_batching_order_or_subset():
    images = _images(n=11)
    whole = ActivationPooler(response_kinds_net(), batch_size=64).fit(images).transform(images)
    small = ActivationPooler(response_kinds_net(), batch_size=3).fit(images).transform(images)
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-6)
    order = np.random.default_rng(0).permutation(11)
    pooler = ActivationPooler(response_kinds_net(), batch_size=3).fit(images)
    np.testing.assert_allclose(pooler.transform(images[order]), small[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooler.transform(images[5:9]), small[5:9], rtol=1e-5, atol=1e-6)


def test_clone_pickle_refit_and_readonly_memmap(tmp_path):
    images = _images()
    pooler = ActivationPooler(response_kinds_net(), layers=["3"])
    assert pooler.fit(images) is pooler
    expected = pooler.transform(images)
    attributes = (pooler.layers_, pooler.responses_, pooler.n_channels_)
    assert (pooler.fit(images).layers_, pooler.responses_, pooler.n_channels_) == attributes
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pooler)).transform(images), expected)
    cloned = clone(pooler)
    assert cloned.model is not pooler.model and not hasattr(cloned, "layers_")
    np.testing.assert_array_equal(cloned.fit_transform(images), expected)
    joblib.dump(images, tmp_path / "images.joblib")
    readonly = joblib.load(tmp_path / "images.joblib", mmap_mode="r")
    np.testing.assert_array_equal(pooler.transform(readonly), expected)


def test_progress_bar_on_stderr(capsys):
    pooler = ActivationPooler(response_kinds_net(), batch_size=4, progress=True).fit(_images())
    capsys.readouterr()
    pooler.transform(_images())
    err = capsys.readouterr().err
    assert "pooling" in err and "3/3" in err
    pooler.set_params(progress=False).transform(_images())
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- memory


def _counting_net():
    counter = _Counting()
    return nn.Sequential(counter, nn.Conv2d(3, 4, 3), nn.ReLU()), counter


@pytest.mark.parametrize("as_memory", [False, True])
def test_memory_skips_forward_passes_for_repeated_data(tmp_path, as_memory):
    location = str(tmp_path / "cache")
    memory = joblib.Memory(location, verbose=0) if as_memory else location
    images = _images()
    model, counter = _counting_net()
    pooler = ActivationPooler(model, memory=memory).fit(images)
    counter.seen = 0
    first = pooler.transform(images)
    assert counter.seen == 10
    np.testing.assert_array_equal(pooler.transform(images), first)
    assert counter.seen == 10
    twin = clone(pooler).fit(images)  # a copy of the model: same weights, same key
    twin.model[0].seen = 0
    np.testing.assert_array_equal(twin.transform(images), first)
    assert twin.model[0].seen == 0
    pooler.transform(_images(seed=1))
    assert counter.seen == 20


def test_memory_key_covers_weights_layers_and_preprocess(tmp_path):
    images = _images()
    model, counter = _counting_net()
    pooler = ActivationPooler(model, memory=str(tmp_path)).fit(images)
    pooler.transform(images)
    seen = counter.seen

    with torch.no_grad():
        model[1].weight[0] += 1
    changed = pooler.transform(images)
    assert counter.seen == seen + 10
    reference = ActivationPooler(model).fit(images).transform(images)
    np.testing.assert_array_equal(changed, reference)

    def scaled(factor):
        return lambda batch: batch * factor

    half = ActivationPooler(model, preprocess=scaled(0.5), memory=str(tmp_path)).fit(images)
    seen = counter.seen
    half.transform(images)
    half.transform(images)
    assert counter.seen == seen + 10
    third = clone(half).set_params(preprocess=scaled(1 / 3)).fit(images)
    assert not np.array_equal(third.transform(images), half.transform(images))

    two_convs = nn.Sequential(_Counting(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    first_only = ActivationPooler(two_convs, layers=["1"], memory=str(tmp_path)).fit(images)
    assert first_only.transform(images).shape == (10, 4)
    both = clone(first_only).set_params(layers="conv").fit(images)
    assert both.transform(images).shape == (10, 6)


def test_unhashable_input_warns_and_still_pools(tmp_path):
    class Local(Dataset):  # a local class cannot be pickled, hence not hashed
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.full((3, 8, 8), index / 3)

    pooler = ActivationPooler(response_kinds_net(), memory=str(tmp_path)).fit(Local())
    with pytest.warns(UserWarning, match="memory is not used"):
        assert pooler.transform(Local()).shape == (3, 15)


# ---------------------------------------------------------------- estimator checks

#: Where this module tests, with images, what scikit-learn's checks test with 2-D tabular X.
_COVERED_WITH_IMAGES = {
    "check_fit_score_takes_y": "test_fitted_attributes",
    "check_estimators_overwrite_params": "test_clone_pickle_refit_and_readonly_memmap",
    "check_dont_overwrite_parameters": "test_clone_pickle_refit_and_readonly_memmap",
    "check_estimators_fit_returns_self": "test_clone_pickle_refit_and_readonly_memmap",
    "check_readonly_memmap_input": "test_clone_pickle_refit_and_readonly_memmap",
    "check_positive_only_tag_during_fit": "test_pooled_values_equal_channel_means_of_the_full_maps",
    "check_estimators_dtypes": "test_every_input_format_gives_identical_features",
    "check_estimators_empty_data_messages": "test_bad_input_raises_value_error_in_fit_and_transform",
    "check_pipeline_consistency": "test_clone_pickle_refit_and_readonly_memmap",
    "check_estimators_nan_inf": "test_bad_input_raises_value_error_in_fit_and_transform",
    "check_estimators_pickle": "test_clone_pickle_refit_and_readonly_memmap",
    "check_f_contiguous_array_estimator": "test_every_input_format_gives_identical_features",
    "check_transformer_general": "test_features_do_not_depend_on_batching_order_or_subset",
    "check_transformer_preserve_dtypes": "test_pooled_values_equal_channel_means_of_the_full_maps",
    "check_methods_sample_order_invariance": "test_features_do_not_depend_on_batching_order_or_subset",
    "check_methods_subset_invariance": "test_features_do_not_depend_on_batching_order_or_subset",
    "check_fit2d_1sample": "test_bad_input_raises_value_error_in_fit_and_transform",
    "check_fit2d_1feature": "test_bad_input_raises_value_error_in_fit_and_transform",
    "check_fit2d_predict1d": "test_bad_input_raises_value_error_in_fit_and_transform",
    "check_dict_unchanged": "test_model_is_unchanged_by_fit_and_transform",
    "check_fit_idempotent": "test_clone_pickle_refit_and_readonly_memmap",
    "check_fit_check_is_fitted": "test_bad_parameters",
}
EXPECTED_FAILED_CHECKS = image_estimator_expected_failures(_COVERED_WITH_IMAGES)
_CHECKED = ActivationPooler(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@parametrize_with_checks([_CHECKED])
def test_sklearn_contract(estimator, check):
    run_image_estimator_check(estimator, check, EXPECTED_FAILED_CHECKS)


def test_every_expected_failure_names_a_check_that_runs():
    assert_expected_failures_are_current(_CHECKED, EXPECTED_FAILED_CHECKS, sys.modules[__name__])


def test_documentation_examples_run():
    assert doctest.testmod(sklearn_craft.pooling).failed == 0
    assert doctest.testfile(str(DOCS), module_relative=False).failed == 0


def test_failed_fit_leaves_nothing_fitted_and_a_failed_refit_keeps_the_previous_fit():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 1)
            self.twice = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.twice(self.twice(self.used(x)))

    images = _images(n=2)
    only_twice = lambda name, module: name == "twice"  # noqa: E731
    fresh = ActivationPooler(Net(), layers=only_twice)
    with pytest.warns(UserWarning, match="not pooling"), pytest.raises(ValueError, match="selects no conv"):
        fresh.fit(images)
    assert not [name for name in vars(fresh) if name.endswith("_")]
    with pytest.raises(NotFittedError):
        fresh.transform(images)

    fitted = ActivationPooler(Net(), layers=["used"]).fit(images)
    before = dict(vars(fitted))
    with pytest.warns(UserWarning, match="not pooling"), pytest.raises(ValueError, match="selects no conv"):
        fitted.set_params(layers=only_twice).fit(images)
    assert all(vars(fitted)[name] is value for name, value in before.items() if name.endswith("_"))
    assert fitted.responses_ == {"used": "used"}


def test_iter_transform_yields_the_rows_of_transform_batch_by_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    images = np.random.default_rng(0).integers(0, 256, size=(11, 16, 16, 3), dtype=np.uint8)
    pooler = ActivationPooler(model, batch_size=4).fit(images)
    batches = pooler.iter_transform(images, batch_size=5)
    assert torch.is_inference_mode_enabled() is False
    first = next(batches)
    # Between batches the caller is outside inference mode, and the model is as it was given.
    assert not torch.is_inference_mode_enabled() and model.training
    chunks = [first, *batches]
    assert [len(chunk) for chunk in chunks] == [5, 5, 1] and all(chunk.dtype == np.float32 for chunk in chunks)
    # Another batch size may round the convolutions differently; the same one gives the same bits.
    np.testing.assert_allclose(np.concatenate(chunks), pooler.transform(images), rtol=1e-5, atol=1e-6)
    chunks = list(pooler.iter_transform(images))
    assert [len(chunk) for chunk in chunks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), pooler.transform(images))
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        pooler.iter_transform(images, batch_size=0)
    with pytest.raises(NotFittedError):
        ActivationPooler(model).iter_transform(images)
