import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.fx
from torch import nn

from sklearn_craft.models import (
    MaxFeatureMap,
    lightcnn9,
    load_weights,
    mobilenet_v1,
    mobilenet_v1_costs,
    mobilenet_v2,
    resnet18,
    vgg16,
)
from sklearn_craft.models.lightcnn import MFMLayer
from sklearn_craft.models.mobilenet import _V1_BLOCKS, MobileNetV1
from sklearn_craft.profiling import count_flops

COSTS_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mobilenet_costs.csv"

from conftest import ARCHITECTURES, CONFIGURABLE


def _convs(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _on_meta(constructor, **kwargs):
    """Build a full-size network without allocating or initialising its weights."""
    with torch.device("meta"):
        return constructor(**kwargs)


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CONFIGURABLE)
@pytest.mark.parametrize("num_classes", [1, 7])
def test_output_shape_follows_num_classes(name, num_classes):
    model = ARCHITECTURES[name].build(num_classes=num_classes)
    assert model(torch.rand(3, *ARCHITECTURES[name].input_shape)).shape == (3, num_classes)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_leaf_module_runs_once_per_forward(name):
    # The pooler hooks activation modules: a module called twice would mix two responses.
    shape = ARCHITECTURES[name].input_shape
    model = ARCHITECTURES[name].build()
    calls = {}
    for module_name, module in model.named_modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(lambda *_, n=module_name: calls.__setitem__(n, calls.get(n, 0) + 1))
    model(torch.rand(2, *shape))
    assert calls and set(calls.values()) == {1}


@pytest.mark.parametrize("name", CONFIGURABLE)
def test_in_channels(name):
    shape = ARCHITECTURES[name].input_shape
    model = ARCHITECTURES[name].build(num_classes=2, in_channels=5)
    assert _convs(model)[0][1].in_channels == 5
    assert model(torch.rand(2, 5, *shape[1:])).shape == (2, 2)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_symbolically_traceable(name):
    model = ARCHITECTURES[name].build()
    x = torch.rand(2, *ARCHITECTURES[name].input_shape)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("batch_norm, last_conv", [(False, "features.28"), (True, "features.40")])
def test_vgg16_layout(batch_norm, last_conv):
    model = _on_meta(vgg16, batch_norm=batch_norm)
    convs = _convs(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and len(linears) == 3
    assert convs[-1][0] == last_conv
    assert [c.out_channels for _, c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert isinstance(model.classifier[0], nn.Flatten)
    assert [model.classifier[i] for i in (1, 4, 7)] == linears
    assert linears[0].in_features == 512 * 7 * 7 and linears[-1].out_features == 2622
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (13 if batch_norm else 0)


def test_vgg16_parameter_count_is_vgg_face():
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * c_in * c_out + c_out for c_in, c_out in zip(widths[:-1], widths[1:]))
    fcs = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 2622 + 2622)
    assert _count(_on_meta(vgg16)) == convs + fcs


@pytest.mark.parametrize("input_size, flat", [(32, 1), (112, 3 * 3), ((100, 70), 3 * 2), (224, 7 * 7)])
def test_vgg16_first_linear_follows_input_size(input_size, flat):
    model = vgg16(num_classes=4, input_size=input_size, width_mult=0.0625).eval()
    channels = _convs(model)[-1][1].out_channels
    assert model.classifier[1].in_features == channels * flat
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    assert model(torch.rand(1, 3, *size)).shape == (1, 4)


def test_resnet18_matches_torchvision_layout():
    model = _on_meta(resnet18)
    assert _count(model) == 11689512  # torchvision.models.resnet18()
    names = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.num_batches_tracked"} <= names
    assert {f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4)} <= names
    assert not any(n.startswith("layer1.0.downsample") for n in names)
    assert len(_convs(model)) == 20
    block = model.layer2[0]
    assert block.relu1 is not block.relu2


def test_resnet18_residual_is_added():
    model = resnet18(num_classes=2, width_mult=0.125).eval()
    block = model.layer1[0]
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    branch = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    assert torch.allclose(block(x), torch.relu(branch + x))


def test_mobilenet_v1_is_depthwise_separable():
    alpha = 0.5
    model = mobilenet_v1(num_classes=40, width_mult=alpha)
    widths = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert model.features[0][0].out_channels == int(32 * alpha) and model.features[0][0].stride == (2, 2)
    assert len(model.features) == 14
    for block, width, stride in zip(model.features[1:], widths, strides):
        depthwise, pointwise = block[0], block[3]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert depthwise.kernel_size == (3, 3) and depthwise.stride == (stride, stride)
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
        assert pointwise.in_channels == depthwise.out_channels and pointwise.out_channels == int(width * alpha)
    assert model.classifier.in_features == 512
    assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, 512, 2, 2)  # stride 32


def test_mobilenet_v1_parameter_count():
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    expected = 3 * 32 * 9 + 2 * 32
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        expected += 9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
    expected += 1024 * 1000 + 1000
    assert _count(_on_meta(mobilenet_v1)) == expected


@pytest.mark.parametrize("rho, side", [(1.0, 224), (6 / 7, 192), (5 / 7, 160), (4 / 7, 128), (2 / 7, 64), (0.5, 112)])
def test_mobilenet_v1_resolution_mult_sets_the_input_size(rho, side):
    model = mobilenet_v1(num_classes=2, width_mult=0.125, resolution_mult=rho, in_channels=1).eval()
    assert (model.input_size, model.input_shape, model.resolution_mult) == (side, (1, side, side), rho)
    # Stride 32: the last feature map is side / 32 (rounded up by the "same" paddings).
    assert model.features(torch.zeros(1, *model.input_shape)).shape[2:] == (-(-side // 32),) * 2


def test_mobilenet_v1_resolution_mult_scales_mult_adds_by_rho_squared_and_keeps_parameters():
    def costs(rho):
        model = _on_meta(mobilenet_v1, width_mult=0.5, resolution_mult=rho)
        return count_flops(model, model.input_shape), _count(model)

    classifier = 512 * 1000  # the Linear layer does not depend on the input size
    flops_1, params_1 = costs(1.0)
    for sevenths in (6, 5, 4, 2):
        flops, params = costs(sevenths / 7)
        assert params == params_1
        # Every map of a 224 / 192 / 160 / 128 / 64 input halves exactly, so the convolutions scale by rho^2.
        assert Fraction(flops - classifier, flops_1 - classifier) == Fraction(sevenths, 7) ** 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"resolution_mult": 0}, ValueError, r"resolution_mult must be in \(0, 1\], got 0"),
        ({"resolution_mult": 1.5}, ValueError, r"resolution_mult must be in \(0, 1\], got 1.5"),
        ({"resolution_mult": float("nan")}, ValueError, r"resolution_mult must be in \(0, 1\]"),
        ({"resolution_mult": 0.001}, ValueError, "at least 1 pixel"),
        ({"resolution_mult": True}, TypeError, "resolution_mult must be a real number"),
        ({"resolution_mult": "1"}, TypeError, "resolution_mult must be a real number"),
        ({"width_mult": 0}, ValueError, "width_mult must be > 0"),
    ],
)
def test_mobilenet_v1_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mobilenet_v1(**kwargs)


def _formula_mult_adds(alpha, side, num_classes, separable):
    """Wang & Wong Eq. (2) and (6): D_K^2 M N D_F^2 per standard block, (D_K^2 + N) M D_F^2 per separable one."""
    d_k, m, d_f = 3, max(1, int(32 * alpha)), -(-side // 2)
    total = d_k * d_k * 3 * m * d_f * d_f  # the first convolution is standard in both networks
    for channels, stride in _V1_BLOCKS:
        n, d_f = max(1, int(channels * alpha)), -(-d_f // stride)
        total += (d_k * d_k + n) * m * d_f * d_f if separable else d_k * d_k * m * n * d_f * d_f
        m = n
    return total + m * num_classes


@pytest.mark.parametrize("alpha, rho, num_classes", [(1.0, 1.0, 1000), (0.5, 5 / 7, 40), (0.25, 4 / 7, 40)])
def test_mobilenet_v1_costs_follow_the_papers_formulas(alpha, rho, num_classes):
    row = mobilenet_v1_costs([alpha], [rho], num_classes=num_classes).iloc[0]
    side = round(rho * 224)
    assert row["input_size"] == side
    assert row["mult_adds"] == _formula_mult_adds(alpha, side, num_classes, separable=True)
    assert row["standard_mult_adds"] == _formula_mult_adds(alpha, side, num_classes, separable=False)
    assert row["mult_adds_ratio"] == row["standard_mult_adds"] / row["mult_adds"]
    assert row["parameters_ratio"] == row["standard_parameters"] / row["parameters"]


def test_mobilenet_v1_block_cost_ratio_is_one_over_n_plus_one_over_nine():
    # Wang & Wong Eq. (7), layer by layer: the separable block over the standard convolution.
    separable = _on_meta(mobilenet_v1, width_mult=0.25, resolution_mult=4 / 7)
    with torch.device("meta"):
        standard = MobileNetV1(1000, 0.25, 3, 4 / 7, separable=False)
    flops = {
        name: count_flops(model, model.input_shape, by_layer=True).set_index("layer")["flops"]
        for name, model in (("separable", separable), ("standard", standard))
    }
    for i in range(1, 14):
        n = separable.features[i][3].out_channels
        block = flops["separable"][f"features.{i}.0"] + flops["separable"][f"features.{i}.3"]
        assert Fraction(int(block), int(flops["standard"][f"features.{i}.0"])) == Fraction(1, n) + Fraction(1, 9)


@pytest.fixture(scope="module")
def paper_costs():
    return mobilenet_v1_costs()


def test_mobilenet_v1_costs_match_the_published_totals(paper_costs):
    # Howard et al. 2017, Tables 4, 6 and 7 (1000 classes): million mult-adds and parameters.
    published = {
        (1.0, 224): (569, 4.2),
        (0.75, 224): (325, 2.6),
        (0.5, 224): (149, 1.3),
        (0.25, 224): (41, 0.5),
        (1.0, 192): (418, 4.2),
        (1.0, 160): (290, 4.2),
        (1.0, 128): (186, 4.2),
    }
    costs = paper_costs.set_index(["width_mult", "input_size"])
    for key, (mult_adds, parameters) in published.items():
        assert abs(costs.loc[key, "mult_adds"] / 1e6 - mult_adds) < 1
        assert round(costs.loc[key, "parameters"] / 1e6, 1) == parameters
    conv = costs.loc[(1.0, 224)]  # "Conv MobileNet": 4866 M mult-adds, 29.3 M parameters
    assert abs(conv["standard_mult_adds"] / 1e6 - 4866) < 2 and round(conv["standard_parameters"] / 1e6, 1) == 29.3
    assert paper_costs[["width_mult", "input_size"]].values.tolist() == [
        [alpha, side] for alpha in (1.0, 0.75, 0.5, 0.25) for side in (224, 192, 160, 128)
    ]


def test_documented_cost_table_is_the_computed_one(paper_costs):
    # docs/attributes.rst shows benchmarks/results/mobilenet_costs.csv: mobilenet_v1_costs(), counts in
    # millions, everything rounded to 2 decimals (3 for rho).
    documented = pd.read_csv(COSTS_CSV)
    millions = ["mult_adds", "parameters", "standard_mult_adds", "standard_parameters"]
    expected = paper_costs.assign(**{column: paper_costs[column] / 1e6 for column in millions})
    expected = expected.rename(columns={column: f"{column}_M" for column in millions})
    assert list(documented.columns) == list(expected.columns)
    np.testing.assert_allclose(documented.to_numpy(float), expected.to_numpy(float), rtol=0, atol=0.005 + 1e-9)


def test_mobilenet_v2_matches_torchvision_layout():
    model = _on_meta(mobilenet_v2)
    assert _count(model) == 3504872  # torchvision.models.mobilenet_v2()
    names = set(model.state_dict())
    expected = {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.2.running_var",
                "features.2.conv.1.0.weight", "features.2.conv.3.weight", "features.18.0.weight",
                "classifier.1.weight"}
    assert expected <= names
    assert sum(block.use_res_connect for block in model.features[1:-1]) == 10
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_lightcnn9_matches_reference_layout():
    model = _on_meta(lightcnn9)
    # LightCNN-9 without its classifier has 5,480,864 parameters (Wu et al., network_9layers).
    assert _count(model) - _count(model.fc2) == 5480864
    assert model.fc2.out_features == 79077 and model.fc1.filter.in_features == 128 * 8 * 8
    names = set(model.state_dict())
    assert {"features.0.filter.weight", "features.2.conv_a.filter.weight", "features.7.conv.filter.bias",
            "fc1.filter.weight", "fc2.weight"} <= names
    mfm_layers = [m for m in model.modules() if isinstance(m, MFMLayer)]
    assert len(mfm_layers) == 10 and len(_convs(model)) == 9
    assert sum(isinstance(m, MaxFeatureMap) for m in model.modules()) == 10


@pytest.mark.parametrize("input_size, side", [(128, 8), (100, 7), (17, 2)])
def test_lightcnn9_fc1_follows_input_size(input_size, side):
    model = lightcnn9(num_classes=3, input_size=input_size, width_mult=0.125).eval()
    channels = _convs(model)[-1][1].out_channels // 2
    assert model.fc1.filter.in_features == channels * side * side
    assert model(torch.rand(2, 1, input_size, input_size)).shape == (2, 3)


def test_max_feature_map_takes_max_of_halves():
    mfm = MaxFeatureMap()
    x = torch.randn(2, 6, 3, 3)
    out = mfm(x)
    assert out.shape == (2, 3, 3, 3)
    for i in range(3):
        assert torch.equal(out[:, i], torch.maximum(x[:, i], x[:, 3 + i]))
    flat = torch.randn(4, 10)
    assert torch.equal(mfm(flat), torch.maximum(flat[:, :5], flat[:, 5:]))


def test_max_feature_map_follows_channel_pruning():
    layer = MFMLayer(3, 4)
    x = torch.randn(2, 3, 5, 5)
    keep = [0, 2]  # MFM outputs kept -> convolution filters i and C + i
    filters = keep + [4 + i for i in keep]
    pruned = nn.Conv2d(3, 4, 3, padding=1)
    pruned.weight.data = layer.filter.weight.data[filters].clone()
    pruned.bias.data = layer.filter.bias.data[filters].clone()
    layer.filter = pruned
    with torch.no_grad():
        full = MaxFeatureMap()(nn.functional.conv2d(x, layer.filter.weight, layer.filter.bias, padding=1))
        assert torch.equal(layer(x), full)
    assert layer(x).shape == (2, 2, 5, 5)


def test_max_feature_map_rejects_odd_channels():
    with pytest.raises(ValueError, match="even number of channels, got 3"):
        MaxFeatureMap()(torch.randn(1, 3, 2, 2))


def test_mfm_linear_variant():
    layer = MFMLayer(12, 5, linear=True)
    assert isinstance(layer.filter, nn.Linear) and layer.filter.out_features == 10
    x = torch.randn(3, 12)
    y = layer.filter(x)
    assert torch.equal(layer(x), torch.maximum(y[:, :5], y[:, 5:]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be an int"),
        ({"in_channels": True}, TypeError, "in_channels must be an int"),
        ({"width_mult": 0}, ValueError, "width_mult must be > 0"),
        ({"width_mult": "1"}, TypeError, "width_mult must be a real number"),
        ({"input_size": 16}, ValueError, "at least 32 pixels"),
        ({"input_size": (64, 64, 3)}, TypeError, "pair of ints"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        vgg16(**kwargs)


RESNET = ARCHITECTURES["resnet18"]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"net_state_dict": sd, "acc": 0.9},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "state_dict", "net_state_dict", "module_prefix"],
)
def test_load_weights_round_trip(tmp_path, wrap):
    source = RESNET.build(num_classes=2)
    path = tmp_path / "weights.pt"
    torch.save(wrap(source.state_dict()), path)
    target = resnet18(num_classes=2, width_mult=0.125)
    assert load_weights(target, path) is target
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_weights_lists_missing_unexpected_and_shapes(tmp_path):
    state = RESNET.build(num_classes=3).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    target = RESNET.build(num_classes=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(target, path)
    message = str(info.value)
    assert "missing keys (1): layer1.0.conv1.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "fc.weight (3, 64) in the file, (2, 64) in the model" in message and "fc.bias" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_load_weights_not_strict_loads_what_matches(tmp_path):
    source = RESNET.build(num_classes=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = resnet18(num_classes=2, width_mult=0.125)
    fc_before = target.fc.weight.clone()
    with pytest.warns(UserWarning, match="fc.weight"):
        load_weights(target, path, strict=False)
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.fc.weight, fc_before)


def test_load_weights_transform(tmp_path):
    source = RESNET.build(num_classes=2)
    path = tmp_path / "weights.pt"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, path)
    target = resnet18(num_classes=2, width_mult=0.125)
    load_weights(target, path, transform=lambda sd: {k.removeprefix("backbone."): v for k, v in sd.items()})
    assert torch.equal(target.fc.weight, source.fc.weight)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_load_weights_never_unpickles_code(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_weights(RESNET.build(num_classes=2), path)
    assert not _UNPICKLED


def test_load_weights_rejects_non_state_dicts(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"epoch": 3, "conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"not a state dict: entries \['epoch'\]"):
        load_weights(RESNET.build(num_classes=2), path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list"):
        load_weights(RESNET.build(num_classes=2), path)
    with pytest.raises(TypeError, match="path must be a str"):
        load_weights(RESNET.build(num_classes=2), RESNET.build(num_classes=2).state_dict())
