
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_craft.models import lightcnn9, mobilenet_v1, mobilenet_v2, resnet18, vgg16
from sklearn_craft.inspection import find_responses
from sklearn_craft.surgery import attach_head, coupled_groups, merge_keep, prune_channels, truncate

from conftest import ARCHITECTURES, randomize

ATOL = 1e-5


# --- small networks covering the dependency kinds one at a time -------------------------------


class ChunkMFM(nn.Module):
    """Max-Feature-Map written with chunk (a SplitBackward node in autograd)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.max(a, b)


class ChunkMFMNet(nn.Module):
    """conv -> chunk-MFM -> conv -> chunk-MFM -> Flatten -> Linear, on a 4x4 map."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mfm1 = ChunkMFM()
        self.conv2 = nn.Conv2d(4, 12, 3, padding=1)
        self.mfm2 = ChunkMFM()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.mfm2(self.conv2(self.mfm1(self.conv1(x))))))


class ReferenceMFM(nn.Module):
    """The reference LightCNN layout: the split size is a stored int of the module holding the conv."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.filter = nn.Conv2d(in_channels, 2 * out_channels, 3, padding=1)

    def forward(self, x):
        x = self.filter(x)
        out = torch.split(x, self.out_channels, 1)
        return torch.max(out[0], out[1])


class ReferenceMFMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = ReferenceMFM(3, 6)
        self.layer2 = ReferenceMFM(6, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(x))), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv with PReLU and a Flatten -> Linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.relu_a = nn.ReLU()
        self.b = nn.Conv2d(3, 5, 1)
        self.bn_b = nn.BatchNorm2d(5)
        self.relu_b = nn.ReLU()
        self.c = nn.Conv2d(11, 7, 3, padding=1)
        self.prelu = nn.PReLU(7)
        self.fc = nn.Linear(7 * 4 * 4, 2)

    def forward(self, x):
        y = torch.cat([self.relu_a(self.a(x)), self.relu_b(self.bn_b(self.b(x)))], dim=1)
        return self.fc(torch.flatten(self.prelu(self.c(y)), 1))


class ResidualNet(nn.Module):
    """conv -> [conv -> conv] + identity: stem and second conv are coupled."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(self.relu(self.conv1(x)))
        return self.head(x.mean(dim=(2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


# --- helpers ----------------------------------------------------------------------------------


def _convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _random_keep(model, rng, fraction=0.5):
    return {
        name: sorted(rng.choice(conv.out_channels, size=max(1, int(fraction * conv.out_channels)), replace=False))
        for name, conv in _convs(model).items()
    }


def _masked_output(model, kept, x, scale=None):
    """Output of ``model`` with every response channel not in ``kept`` zeroed (and kept ones scaled)."""
    responses = find_responses(model, list(kept), example_input=x)
    modules = dict(model.named_modules())
    handles = []
    for conv, response in responses.items():
        mask = torch.zeros(modules[conv].out_channels)
        mask[kept[conv]] = 1.0 if scale is None or conv not in scale else torch.tensor(scale[conv], dtype=torch.float32)
        handles.append(modules[response].register_forward_hook(lambda m, i, o, mask=mask: o * mask.view(1, -1, 1, 1)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()


def _assert_exact(model, pruned, kept, x, scale=None, output_channels=slice(None)):
    """Pruned output == masked original output (restricted to ``output_channels`` when the output is a map)."""
    for name, conv in _convs(pruned).items():
        if name in kept:
            assert conv.out_channels == len(kept[name]), name
    with torch.no_grad():
        got = pruned.eval()(x)
    expected = _masked_output(model, kept, x, scale=scale)[:, output_channels]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _n_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --- exactness on networks without residual coupling ------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vgg16_pruned_equals_masked(batch_norm, seed):
    # 64x64 input: the last map is 2x2, so Flatten -> Linear loses 4 features per channel.
    model = randomize(vgg16(num_classes=5, batch_norm=batch_norm, input_size=64, width_mult=0.125), seed)
    x = torch.randn(3, 3, 64, 64)
    keep = _random_keep(model, np.random.default_rng(seed), fraction=0.4)
    pruned = prune_channels(model, keep, x)
    _assert_exact(model, pruned, keep, x)
    assert pruned.classifier[1].in_features == 4 * len(keep["features.40" if batch_norm else "features.28"])


def test_mobilenet_v1_depthwise_pruned_equals_masked():
    model = randomize(mobilenet_v1(num_classes=4, width_mult=0.25))
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(3)
    keep = _random_keep(model, rng)
    # A depthwise conv's channels are those of its input's producer: give both the same set.
    names = list(_convs(model))
    for producer, depthwise in zip(names[:-1], names[1:]):
        if model.get_submodule(depthwise).groups > 1:
            keep[depthwise] = keep[producer]
    pruned = prune_channels(model, keep, x)
    _assert_exact(model, pruned, keep, x)
    assert pruned.features[2][0].groups == len(keep["features.1.3"])


def test_lightcnn9_mfm_pairs_pruned_equals_masked():
    model = lightcnn9(num_classes=3, input_size=32, width_mult=0.25).eval()
    x = torch.randn(2, 1, 32, 32)
    rng = np.random.default_rng(4)
    keep = {}
    for name, conv in _convs(model).items():
        half = conv.out_channels // 2
        outputs = rng.choice(half, size=max(1, half // 3), replace=False)
        keep[name] = sorted(np.concatenate([outputs, outputs + half]).tolist())
    pruned = prune_channels(model, keep, x)
    _assert_exact(model, pruned, keep, x)
    last = len(keep["features.7.conv.filter"]) // 2
    assert pruned.fc1.filter.in_features == last * 2 * 2


def test_mfm_keeps_both_halves_of_a_pair():
    model = lightcnn9(num_classes=3, input_size=32, width_mult=0.25).eval()
    x = torch.randn(2, 1, 32, 32)
    half = model.features[0].filter.out_channels // 2
    pruned = prune_channels(model, {"features.0.filter": [1, half + 1, 2 + half]}, x)
    assert pruned.features[0].filter.out_channels == 4  # MFM outputs 1 and 2, both halves each
    _assert_exact(model, pruned, {"features.0.filter": [1, 2, half + 1, half + 2]}, x)


@pytest.mark.parametrize("net", [ChunkMFMNet, ReferenceMFMNet, ConcatNet])
def test_small_nets_pruned_equal_masked(net):
    model = randomize(net())
    x = torch.randn(2, 3, 4, 4)
    keep = {}
    for name, conv in _convs(model).items():
        if isinstance(model, ConcatNet):
            keep[name] = [0, conv.out_channels - 2]
        else:  # one Max-Feature-Map output: both halves feeding it
            keep[name] = [1, conv.out_channels // 2 + 1]
    pruned = prune_channels(model, keep, x)
    _assert_exact(model, pruned, keep, x)


def test_reference_mfm_stored_split_size_is_updated():
    model = ReferenceMFMNet().eval()
    pruned = prune_channels(model, {"layer2.filter": [0, 5, 3, 8]}, torch.randn(1, 3, 4, 4))
    assert (pruned.layer2.out_channels, pruned.layer2.filter.out_channels, pruned.fc.in_features) == (2, 4, 8)
    assert model.layer2.out_channels == 5


# --- scale_filters (ETL Eq. 5) ----------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
def test_scale_multiplies_the_response_of_kept_filters(batch_norm):
    model = randomize(vgg16(num_classes=3, batch_norm=batch_norm, input_size=32, width_mult=0.125))
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(5)
    keep = _random_keep(model, rng)
    # Positive multipliers commute with ReLU: the response itself is scaled.
    scale = {name: rng.uniform(0.5, 2.0, size=len(idx)).tolist() for name, idx in keep.items()}
    pruned = prune_channels(model, keep, x, scale=scale)
    _assert_exact(model, pruned, keep, x, scale=scale)
    reference = prune_channels(model, keep, x)
    if batch_norm:  # the conv is untouched, the BatchNorm carries the multiplier
        torch.testing.assert_close(pruned.features[0].weight, reference.features[0].weight)
        torch.testing.assert_close(
            pruned.features[1].weight, reference.features[1].weight * torch.tensor(scale["features.0"])
        )
    else:
        torch.testing.assert_close(
            pruned.features[0].bias, reference.features[0].bias * torch.tensor(scale["features.0"])
        )


def test_scale_follows_keep_order():
    model = randomize(vgg16(num_classes=3, input_size=32, width_mult=0.125))
    x = torch.randn(1, 3, 32, 32)
    a = prune_channels(model, {"features.0": [4, 1]}, x, scale={"features.0": [2.0, 3.0]})
    b = prune_channels(model, {"features.0": [1, 4]}, x, scale={"features.0": [3.0, 2.0]})
    torch.testing.assert_close(a.features[0].weight, b.features[0].weight)
    torch.testing.assert_close(a.features[0].weight[0], 3.0 * model.features[0].weight[1])


# --- residual coupling ------------------------------------------------------------------------


def test_resnet18_groups():
    model = resnet18(num_classes=3, width_mult=0.125)
    groups = coupled_groups(model, torch.zeros(1, 3, 32, 32))
    assert len(groups) == 12
    assert sorted(sum(groups, [])) == sorted(_convs(model))
    assert ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"] in groups
    assert all(len(g) in (1, 3) for g in groups)


def _resnet18_parameters(kept, num_classes):
    """Analytic parameter count of a pruned ResNet-18 from its per-conv channel counts."""
    total = 3 * kept["conv1"] * 49 + 2 * kept["conv1"]
    stream = kept["conv1"]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}."
            total += stream * kept[p + "conv1"] * 9 + 2 * kept[p + "conv1"]
            total += kept[p + "conv1"] * kept[p + "conv2"] * 9 + 2 * kept[p + "conv2"]
            if p + "downsample.0" in kept:
                total += stream * kept[p + "downsample.0"] + 2 * kept[p + "downsample.0"]
            stream = kept[p + "conv2"]
    return total + stream * num_classes + num_classes


def _prune_random_residual(model, x, seed, fraction):
    """Prune with a random keep; return the pruned model and the expected count per conv: the union
    of the group's members that choose (a depthwise convolution follows its input)."""
    keep = _random_keep(model, np.random.default_rng(seed), fraction=fraction)
    pruned = prune_channels(model, keep, x)
    counts = {}
    groups, followers = coupled_groups(model, x, return_followers=True)
    for group in groups:
        union = set().union(*(keep[name] for name in group if name not in followers))
        counts.update({name: len(union) for name in group})
    assert {name: conv.out_channels for name, conv in _convs(pruned).items()} == counts
    with torch.no_grad():
        assert pruned(x).shape == (len(x), 3)
    return pruned, counts


def test_resnet18_pruned_runs_with_union_channels_and_analytic_parameters():
    model = randomize(resnet18(num_classes=3, width_mult=0.25))
    assert _resnet18_parameters({n: c.out_channels for n, c in _convs(model).items()}, 3) == _n_parameters(model)
    pruned, counts = _prune_random_residual(model, torch.randn(2, 3, 32, 32), seed=6, fraction=0.3)
    assert _n_parameters(pruned) == _resnet18_parameters(counts, 3) < _n_parameters(model)


def test_residual_stream_keeps_union_and_prunes_exactly():
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 5, 5)
    keep = {"stem": [0, 3], "conv1": [1, 2, 5], "conv2": [3, 6]}
    pruned = prune_channels(model, keep, x)
    assert (pruned.stem.out_channels, pruned.conv2.out_channels, pruned.head.in_features) == (3, 3, 3)
    # Zeroing stream channels 1, 2, 4, 5, 7 on both branches is exactly their removal.
    stream = [0, 3, 6]
    _assert_exact(model, pruned, {"stem": stream, "conv1": keep["conv1"], "conv2": stream}, x)


def _mobilenet_v2_parameters(model, counts, num_classes):
    """Analytic parameter count of a pruned MobileNet V2 (no conv bias, a BatchNorm after each conv).

    Every conv reads the output of the conv run just before it (a block's input is the previous
    block's projection, which belongs to the same stream).
    """
    total, previous = 0, model.get_submodule("features.0.0").in_channels
    for name, conv in _convs(model).items():
        per_filter = 1 if conv.groups > 1 else previous
        total += counts[name] * per_filter * conv.kernel_size[0] * conv.kernel_size[1] + 2 * counts[name]
        previous = counts[name]
    return total + previous * num_classes + num_classes


def test_mobilenet_v2_pruned_runs_with_analytic_parameters():
    model = randomize(mobilenet_v2(num_classes=3, width_mult=0.25))
    assert _mobilenet_v2_parameters(model, {n: c.out_channels for n, c in _convs(model).items()}, 3) == _n_parameters(
        model
    )
    pruned, counts = _prune_random_residual(model, torch.randn(2, 3, 32, 32), seed=7, fraction=0.4)
    assert _n_parameters(pruned) == _mobilenet_v2_parameters(model, counts, 3) < _n_parameters(model)


# --- every architecture of the catalogue ------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_pruned_equals_masked(name):
    architecture = ARCHITECTURES[name]
    model = randomize(architecture.build())
    x = torch.randn(2, *architecture.input_shape)
    convs = _convs(model)
    widths = {conv_name: conv.out_channels for conv_name, conv in convs.items()}
    before = _state(model)
    rng = np.random.default_rng(0)
    # A random half of every filter bank, except an output layer whose width is the network's output.
    keep = {
        conv_name: sorted(rng.choice(width, max(1, width // 2), replace=False).tolist())
        for conv_name, width in widths.items()
        if conv_name != architecture.output_conv
    }
    pruned, kept = prune_channels(model, keep, x[:1], return_kept=True)
    pruned_convs = _convs(pruned)
    assert list(pruned_convs) == list(convs)
    _, followers = coupled_groups(model, x[:1], return_followers=True)
    for conv_name, indices in keep.items():
        # A depthwise convolution keeps its input's channels; coupled channels (residual additions,
        # Max-Feature-Map pairs) may keep more than asked.
        if conv_name not in followers:
            assert set(indices) <= set(kept[conv_name])
    expected_widths = {conv_name: len(kept.get(conv_name, range(width))) for conv_name, width in widths.items()}
    assert {conv_name: conv.out_channels for conv_name, conv in pruned_convs.items()} == expected_widths
    for conv in pruned_convs.values():
        if conv.groups > 1:
            assert conv.groups == conv.in_channels == conv.out_channels
    assert sum(conv.out_channels for conv in pruned_convs.values()) < sum(widths.values())
    with torch.no_grad():
        got = pruned(x)
    expected = _masked_output(model, kept, x)
    assert got.shape == expected.shape
    # Outputs range from 1e-6 (VGG16 without BatchNorm) to 40: float32 differences scale with them.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=ATOL * expected.abs().max().item())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert {conv_name: conv.out_channels for conv_name, conv in _convs(model).items()} == widths


# --- merge_keep -------------------------------------------------------------------------------


def test_merge_keep_union_and_missing_members():
    groups = [["a", "b", "c"], ["d"]]
    n = {"a": 6, "b": 6, "c": 6, "d": 3}
    merged = merge_keep({"a": [0], "b": [4, 2], "c": [2], "d": [1]}, groups, n)
    assert merged == {"a": [0, 2, 4], "b": [0, 2, 4], "c": [0, 2, 4], "d": [1]}
    with pytest.warns(UserWarning, match="coupled with layers missing"):
        merged = merge_keep({"a": [0], "d": [2]}, groups, n)
    assert merged == {"a": list(range(6)), "d": [2]}


def test_merge_keep_errors():
    with pytest.raises(ValueError, match="disjoint"):
        merge_keep({"a": [0]}, [["a"], ["a", "b"]], {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="equal channel counts"):
        merge_keep({"a": [0], "b": [0]}, [["a", "b"]], {"a": 2, "b": 3})
    with pytest.raises(ValueError, match="missing"):
        merge_keep({"z": [0]}, [], {"a": 2})
    with pytest.raises(TypeError, match="groups"):
        merge_keep({"a": [0]}, "a", {"a": 2})


def test_prune_keep_union_without_merge_call():
    model = ResidualNet().eval()
    pruned = prune_channels(model, {"stem": [0], "conv2": [7], "conv1": [0]}, torch.randn(1, 3, 4, 4))
    assert pruned.stem.out_channels == 2


def test_layers_missing_from_keep_are_intact():
    model = ResidualNet().eval()
    with pytest.warns(UserWarning):
        pruned = prune_channels(model, {"stem": [0], "conv1": [1]}, torch.randn(1, 3, 4, 4))
    assert (pruned.stem.out_channels, pruned.conv1.out_channels, pruned.conv2.out_channels) == (8, 1, 8)


# --- the user's model is untouched; Torch-Pruning's gaps (b) --------------------------------


def test_model_untouched_and_flags_preserved():
    model = randomize(vgg16(num_classes=3, batch_norm=True, input_size=32, width_mult=0.125))
    model.train()
    model.features[1].eval()  # a mixed state must come back as it was
    model.features[0].weight.requires_grad_(False)
    before = _state(model)
    modes = [m.training for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pruned = prune_channels(model, {"features.0": [1, 2], "features.3": [0]}, torch.randn(2, 3, 32, 32))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in model.modules()] == modes
    assert [m.training for m in pruned.modules()] == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags
    assert all(not m._forward_hooks for m in (*model.modules(), *pruned.modules()))
    assert model.features[0].out_channels == 8 and pruned.features[0].out_channels == 2
    # Tracing ran in eval mode: the copy's BatchNorm statistics are the original's, sliced.
    torch.testing.assert_close(pruned.features[1].running_mean, model.features[1].running_mean[[1, 2]])
    torch.testing.assert_close(pruned.features[4].running_var, model.features[4].running_var[[0]])


def test_frozen_model_under_no_grad_and_inference_mode():
    model = vgg16(num_classes=3, input_size=32, width_mult=0.125).eval().requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    keep = {"features.0": [0, 5], "features.28": [3]}
    with torch.no_grad():
        a = prune_channels(model, keep, x)
    with torch.inference_mode():
        b = prune_channels(model, keep, torch.randn(1, 3, 32, 32))
    for pruned in (a, b):
        assert not any(p.requires_grad for p in pruned.parameters())
        assert pruned.features[0].out_channels == 2
        _assert_exact(model, pruned, keep, x)
    assert not any(p.requires_grad for p in model.parameters())


def test_coupled_groups_leaves_model_untouched():
    model = resnet18(num_classes=3, width_mult=0.125).train().requires_grad_(False)
    before = _state(model)
    coupled_groups(model, torch.randn(2, 3, 32, 32))
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vgg():
    return vgg16(num_classes=3, input_size=32, width_mult=0.125).eval()


@pytest.mark.parametrize(
    "keep, error, match",
    [
        ({"features.99": [0]}, ValueError, r"not a module of the model.*features\.0"),
        ({"features.1": [0]}, ValueError, "must name nn.Conv2d modules.*ReLU"),
        ({"features.0": [0, 8]}, ValueError, r"features\.0.*\[0, 8\).*\[8\]"),
        ({"features.0": [-1]}, ValueError, r"features\.0.*\[-1\]"),
        ({"features.0": [1, 1, 2]}, ValueError, r"features\.0.*repeats.*\[1\]"),
        ({"features.0": []}, ValueError, r"features\.0.*empty"),
        ({"features.0": [0.5]}, TypeError, "integer"),
        ([("features.0", [0])], TypeError, "keep must be a dict"),
    ],
)
def test_prune_channels_bad_keep(small_vgg, keep, error, match):
    with pytest.raises(error, match=match):
        prune_channels(small_vgg, keep, torch.zeros(1, 3, 32, 32))


def test_prune_channels_bad_arguments(small_vgg):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(TypeError, match="model"):
        prune_channels("vgg", {}, x)
    with pytest.raises(TypeError, match="example_input"):
        prune_channels(small_vgg, {}, np.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="one multiplier per index"):
        prune_channels(small_vgg, {"features.0": [0, 1]}, x, scale={"features.0": [1.0]})
    with pytest.raises(ValueError, match="not in keep"):
        prune_channels(small_vgg, {"features.0": [0, 1]}, x, scale={"features.2": [1.0]})
    with pytest.raises(ValueError, match="finite"):
        prune_channels(small_vgg, {"features.0": [0]}, x, scale={"features.0": [np.nan]})


def test_prune_channels_rejects_conv_that_does_not_run():
    model = ResidualNet().eval()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="unused.*do not run"):
        prune_channels(model, {"unused": [0]}, torch.zeros(1, 3, 4, 4))


def test_prune_channels_rejects_halving_module_that_is_not_an_mfm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GLU(dim=1), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(ValueError, match=r"\['1'\] halve the channels of '0'"):
        prune_channels(model, {"0": [0, 1, 2, 4, 5, 6]}, torch.zeros(1, 3, 5, 5))


def test_prune_channels_rejects_grouped_convolution():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)).eval()
    with pytest.raises(ValueError, match="grouped convolution"):
        prune_channels(model, {"0": [0, 1, 2]}, torch.zeros(1, 3, 8, 8))


# --- truncate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layer",
    [("vgg16_bn", "features.10"), ("resnet18", "layer2.0.conv1"), ("lightcnn9", "features.4.conv_a.filter")],
)
def test_truncate_outputs_the_response(name, layer):
    model = randomize(ARCHITECTURES[name].build())
    x = torch.randn(2, *ARCHITECTURES[name].input_shape)
    response = find_responses(model, [layer], example_input=x)[layer]
    recorded = []
    handle = model.get_submodule(response).register_forward_hook(lambda m, i, o: recorded.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    before = _state(model)
    model.train()
    model.get_submodule(layer).eval()  # mixed flags come back module by module
    truncated = truncate(model, layer, x)
    assert truncated.training and model.training
    assert type(truncated).__name__ == f"Truncated{type(model).__name__}"
    assert not truncated.get_submodule(layer).training and not model.get_submodule(layer).training
    truncated.eval()
    assert all(not m._forward_hooks for m in truncated.modules())
    with torch.no_grad():
        torch.testing.assert_close(truncated(x), recorded[0])
        torch.testing.assert_close(truncated(x[:1]), recorded[0][:1])
    # Only the layers up to the response are kept, as independent copies.
    assert set(truncated.state_dict()) < set(model.state_dict())
    assert not any(key.startswith(("classifier", "fc")) for key in truncated.state_dict())
    with torch.no_grad():
        for parameter in truncated.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_prune_truncated_lightcnn_pairs_through_inlined_mfm():
    # torch.fx inlines MaxFeatureMap into slices and torch.max: pairs must still be found.
    model = lightcnn9(num_classes=3, input_size=32, width_mult=0.25).eval()
    x = torch.randn(2, 1, 32, 32)
    layer = "features.4.conv.filter"
    truncated = truncate(model, layer, x)
    keep = {"features.2.conv.filter": [0, 3], layer: [1, 2, 5]}
    pruned = prune_channels(truncated, keep, x)
    assert type(pruned).__name__ == "TruncatedLightCNN9"
    half = truncated.get_submodule("features.2.conv.filter").out_channels // 2
    closed = {"features.2.conv.filter": [0, 3, half, half + 3], layer: [1, 2, 5]}  # the last conv has no MFM
    _assert_exact(truncated, pruned, closed, x, output_channels=closed[layer])


def test_truncate_errors(small_vgg):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="DataDependent cannot be traced"):
        truncate(DataDependent(), "conv", x)
    with pytest.raises(ValueError, match="must name nn.Conv2d"):
        truncate(small_vgg, "classifier.1", x)
    with pytest.raises(TypeError, match="layer"):
        truncate(small_vgg, 0, x)


def test_pruned_model_is_independent_and_trainable():
    model = vgg16(num_classes=3, input_size=32, width_mult=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_channels(model, {"features.0": [0, 1, 2]}, x)
    own = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in own for p in pruned.parameters())
    # Optimizers are built after surgery, on the new parameters.
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned(x).sum().backward()
    optimizer.step()
    assert pruned.features[0].weight.grad.shape == (3, 3, 3, 3)


# --- depthwise convolutions follow their input ------------------------------------------------


def test_expand_conv_named_alone_loses_channels_and_its_depthwise_partner_follows():
    model = randomize(mobilenet_v2(num_classes=3, width_mult=0.25), seed=2)
    x = torch.randn(2, 3, 32, 32)
    keep = {"features.2.conv.0.0": [0, 5, 7, 30, 47], "features.4.conv.0.0": [1, 2, 3, 40]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned, kept = prune_channels(model, keep, x, return_kept=True)
    followed = {"features.2.conv.1.0": keep["features.2.conv.0.0"], "features.4.conv.1.0": keep["features.4.conv.0.0"]}
    assert kept == {**keep, **followed}
    assert pruned.get_submodule("features.2.conv.1.0").groups == 5
    _assert_exact(model, pruned, {**keep, **followed}, x)
    groups, followers = coupled_groups(model, x, return_followers=True)
    assert groups == coupled_groups(model, x)
    assert ["features.2.conv.0.0", "features.2.conv.1.0"] in groups
    assert followers == [name for name, conv in _convs(model).items() if conv.groups > 1]


def test_mobilenet_v1_depthwise_convolutions_follow_the_pointwise_ones():
    model = randomize(mobilenet_v1(num_classes=4, width_mult=0.25), seed=5)
    x = torch.randn(2, 3, 32, 32)
    names = list(_convs(model))
    rng = np.random.default_rng(5)
    dense = {name: conv for name, conv in _convs(model).items() if conv.groups == 1}
    keep = {name: sorted(rng.choice(conv.out_channels, size=conv.out_channels // 3, replace=False)) for name, conv in dense.items()}
    # A depthwise convolution's own entry is not consulted: it keeps its input's channels.
    keep["features.2.0"] = [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned, kept = prune_channels(model, keep, x, return_kept=True)
    masked = dict(keep)
    for producer, depthwise in zip(names[:-1], names[1:]):
        if model.get_submodule(depthwise).groups > 1:
            masked[depthwise] = keep[producer]
            assert kept[depthwise] == keep[producer]
    _assert_exact(model, pruned, masked, x)
    # Named alone, a depthwise convolution cannot drop channels its input's producer keeps.
    with pytest.warns(UserWarning, match=r"\['features.2.0'\] keep all their channels.*features.1.3"):
        _, kept = prune_channels(model, {"features.2.0": [0, 1]}, x, return_kept=True)
    assert kept["features.2.0"] == kept["features.1.3"] == list(range(16))


def test_merge_keep_followers_take_the_channels_of_their_group():
    groups = [["a", "dw"], ["b", "c", "dw2"]]
    n = {"a": 4, "dw": 4, "b": 6, "c": 6, "dw2": 6}
    merged = merge_keep({"a": [1, 3], "b": [0], "c": [5], "dw2": [2]}, groups, n, followers=["dw", "dw2"])
    assert merged == {"a": [1, 3], "b": [0, 5], "c": [0, 5], "dw2": [0, 5]}
    with pytest.warns(UserWarning, match=r"\['dw'\] keep all their channels.*\['a'\]"):
        assert merge_keep({"dw": [1]}, groups, n, followers=["dw", "dw2"]) == {"dw": [0, 1, 2, 3]}
    # Without followers, every member is a partner (the union, and a missing one freezes the group).
    with pytest.warns(UserWarning):
        assert merge_keep({"a": [1]}, groups, n) == {"a": [0, 1, 2, 3]}
    with pytest.raises(TypeError, match="followers"):
        merge_keep({"a": [1]}, groups, n, followers="dw")


# --- attach_head --------------------------------------------------------------------------------


class _PoolsTwice(nn.Module):
    """A network whose own ``pool`` module runs before the cut: the added pooling must not replace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv2(self.pool(torch.relu(self.conv1(x))))))
        return self.fc(torch.flatten(x, 1))


def test_attach_head_keeps_the_layer_names_and_computes_pool_then_head():
    model = randomize(_PoolsTwice())
    x = torch.randn(3, 3, 8, 8)
    truncated = truncate(model, "conv2", x)
    head = nn.Linear(5, 4)
    network = attach_head(truncated, head)
    names = dict(network.named_modules())
    assert {"conv1", "pool", "conv2", "pool_1", "flatten", "head"} <= set(names)
    assert names["pool"] is not names["pool_1"] and isinstance(names["pool"], nn.MaxPool2d)
    assert names["head"] is not head and [n for n, _ in truncated.named_children()] == ["conv1", "pool", "conv2"]
    with torch.no_grad():
        torch.testing.assert_close(network(x), head(truncated(x).mean(dim=(2, 3))))
    assert find_responses(network, ["conv2"], example_input=x) == find_responses(truncated, ["conv2"], example_input=x)
    with pytest.raises(TypeError, match="GraphModule"):
        attach_head(model, head)
    with pytest.raises(TypeError, match="head must be a torch.nn.Module"):
        attach_head(truncated, lambda z: z)
