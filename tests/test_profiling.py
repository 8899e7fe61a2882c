import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from sklearn_craft.export import load_model, save_model
from sklearn_craft.models import resnet18
from sklearn_craft.profiling import (
    compare_models,
    count_flops,
    count_parameters,
    filter_flops,
    measure_latency,
    model_size_bytes,
)

from conftest import ARCHITECTURES, strided_grouped_net


def test_flops_equal_analytic_count():
    expected = [
        8 * 3 * 3 * 3 * 5 * 6,  # out x in x k x k x H_out x W_out
        0,
        0,
        8 * 1 * 3 * 3 * 3 * 4,  # depthwise: in / groups = 1
        6 * (8 // 2) * 1 * 1 * 3 * 4,
        0,
        72 * 5,
    ]
    table = count_flops(strided_grouped_net(), (3, 9, 11), by_layer=True)
    assert table["flops"].tolist() == expected
    assert count_flops(strided_grouped_net(), (3, 9, 11)) == sum(expected)


def test_flops_of_1d_and_transposed_convolutions():
    model = nn.Sequential(nn.Conv1d(4, 6, 3), nn.Unflatten(2, (2, 4)), nn.ConvTranspose2d(6, 2, 2, stride=2, groups=2))
    # Conv1d: 6 x 4 x 3 x 8 outputs; transposed: each of the 6 x 2 x 4 inputs meets 2/2 x 2 x 2 weights.
    assert count_flops(model, (4, 10)) == 6 * 4 * 3 * 8 + (6 * 2 * 4) * 1 * 2 * 2


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_flops_are_half_of_flop_counter_mode(name):
    shape = ARCHITECTURES[name].input_shape
    model = ARCHITECTURES[name].build()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *shape))
    assert count_flops(model, shape) == counter.get_total_flops() // 2


def test_flop_table_lists_leaf_calls_in_forward_order():
    model = resnet18(num_classes=3, width_mult=0.125)
    table = count_flops(model, (3, 32, 32), by_layer=True)
    assert list(table.columns) == ["layer", "type", "output_shape", "flops"]
    assert table["layer"].iloc[0] == "conv1" and table["layer"].iloc[-1] == "fc"
    block = table[table["layer"].str.startswith("layer2.0.")]["layer"].tolist()
    assert block == [f"layer2.0.{n}" for n in ("conv1", "bn1", "relu1", "conv2", "bn2", "downsample.0", "downsample.1", "relu2")]
    conv1 = table.set_index("layer").loc["conv1"]
    assert conv1["type"] == "Conv2d" and conv1["output_shape"] == (8, 16, 16)
    assert conv1["flops"] == 8 * 3 * 7 * 7 * 16 * 16
    assert table["flops"].sum() == count_flops(model, (3, 32, 32))


def test_profiling_leaves_model_unchanged():
    model = strided_grouped_net().train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, (3, 9, 11))
    measure_latency(model, (3, 9, 11), repeats=2, warmup=0)
    compare_models(model, model, (3, 9, 11), repeats=1, warmup=0)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True, True]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, state[key]), key


class _DataDependent(nn.Module):
    """Cannot run on the meta device (reads a value), so count_flops falls back to a real pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        x = x * (2.0 if float(x.mean()) > 1e9 else 1.0)
        return self.fc(x.mean((2, 3)))


def test_flops_without_meta_support():
    assert count_flops(_DataDependent(), (2, 6, 6)) == 4 * 2 * 9 * 4 * 4 + 4 * 3


def test_flops_of_functions_called_in_forward_are_counted():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(F.linear(x, self.weight))

    table = count_flops(Functional(), (4,), by_layer=True)
    # The container's row holds only what its own forward computes, after its submodules' rows.
    assert table.values.tolist() == [["fc", "Linear", (2,), 3 * 2], ["", "Functional", (2,), 4 * 3]]
    assert count_flops(Functional(), (4,)) == 4 * 3 + 3 * 2


def test_parameters_and_size():
    model = strided_grouped_net()
    parameters = (8 * 3 * 9 + 8) + 2 * 8 + 8 * 9 + (6 * 4 + 6) + (72 * 5 + 5)
    assert count_parameters(model) == parameters
    # Buffers: BatchNorm running mean and var (float32) and its int64 batch counter.
    assert model_size_bytes(model) == 4 * parameters + 4 * 2 * 8 + 8
    assert model_size_bytes(model.double()) == 8 * parameters + 8 * 2 * 8 + 8


def test_shared_parameters_counted_once():
    linear = nn.Linear(4, 4)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    assert count_parameters(model) == 20 and model_size_bytes(model) == 80


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append((tuple(x.shape), torch.get_num_threads(), self.training, torch.is_inference_mode_enabled()))
        return self.conv(x)


def test_latency_runs_in_eval_under_inference_mode_and_restores_threads():
    model = _Recorder().train()
    torch.set_num_threads(2)
    seconds = measure_latency(model, (3, 8, 8), repeats=5, warmup=2, threads=1, batch_size=4)
    assert isinstance(seconds, float) and seconds > 0
    assert model.calls == [((4, 3, 8, 8), 1, False, True)] * 7
    assert torch.get_num_threads() == 2 and model.training


def test_latency_divides_by_batch_size(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr("sklearn_craft.profiling.time.perf_counter", lambda: 3.0 * next(ticks))
    assert measure_latency(_Recorder(), (3, 4, 4), repeats=3, warmup=1, batch_size=6) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"repeats": 0}, ValueError, "repeats must be >= 1"),
        ({"warmup": -1}, ValueError, "warmup must be >= 0"),
        ({"threads": 0}, ValueError, "threads must be >= 1"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"input_shape": 3}, TypeError, "input_shape must be a non-empty tuple"),
        ({"input_shape": (3, 0, 8)}, ValueError, "input_shape must hold positive ints"),
    ],
)
def test_latency_bad_arguments(kwargs, error, match):
    arguments = {"input_shape": (3, 8, 8), **kwargs}
    with pytest.raises(error, match=match):
        measure_latency(_Recorder(), arguments.pop("input_shape"), **arguments)


def test_latency_needs_a_cpu_model():
    model = _Recorder().to("meta")
    with pytest.raises(ValueError, match="must be on the CPU"):
        measure_latency(model, (3, 8, 8))


def test_compare_models_report():
    original = strided_grouped_net()
    pruned = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4, bias=False),
        nn.Conv2d(4, 2, 1, groups=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 4, 5),
    )
    report = compare_models(original, pruned, (3, 9, 11), repeats=3, warmup=1)
    assert list(report.index) == ["parameters", "size_bytes", "flops", "latency_s"]
    assert list(report.columns) == ["original", "pruned", "reduction_pct"]
    for model, column in ((original, "original"), (pruned, "pruned")):
        assert report.loc["parameters", column] == count_parameters(model)
        assert report.loc["size_bytes", column] == model_size_bytes(model)
        assert report.loc["flops", column] == count_flops(model, (3, 9, 11))
        assert report.loc["latency_s", column] > 0
    expected = 100 * (1 - report["pruned"] / report["original"])
    pd.testing.assert_series_equal(report["reduction_pct"], expected, check_names=False)
    assert list(compare_models(original, pruned, (3, 9, 11), latency=False).index) == ["parameters", "size_bytes", "flops"]
    with pytest.raises(TypeError, match="pruned must be a torch.nn.Module"):
        compare_models(original, "model", (3, 9, 11))


def test_flops_of_a_model_reloaded_from_its_exported_graph(tmp_path):
    model, shape = strided_grouped_net(), (3, 9, 11)
    loaded = load_model(save_model(model, tmp_path / "model.pt2", input_shape=shape))
    assert count_flops(loaded, shape) == count_flops(model, shape) == 6480 + 864 + 288 + 360
    table = count_flops(loaded, shape, by_layer=True)
    assert table[table["flops"] > 0][["layer", "type"]].values.tolist() == [
        ["0", "conv2d.default"], ["3", "conv2d.default"], ["4", "conv2d.default"], ["6", "linear.default"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "lightcnn9"])
def test_flops_of_library_architectures_reloaded_from_their_exported_graph(tmp_path, name):
    architecture = ARCHITECTURES[name]
    model, shape = architecture.build(), architecture.input_shape
    loaded = load_model(save_model(model, tmp_path / "model.pt2", input_shape=shape))
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in loaded.modules())
    assert count_flops(loaded, shape) == count_flops(model, shape) > 0
    # Graph nodes carry the name of the layer they were exported from: the costly rows match.
    table, reloaded = count_flops(model, shape, by_layer=True), count_flops(loaded, shape, by_layer=True)
    costly = ["layer", "output_shape", "flops"]
    assert reloaded[reloaded["flops"] > 0][costly].reset_index(drop=True).equals(
        table[table["flops"] > 0][costly].reset_index(drop=True)
    )
    assert reloaded["flops"].sum() == count_flops(loaded, shape)


def test_flops_of_a_graph_without_module_names_are_per_node():
    graph = torch.fx.symbolic_trace(_FunctionalConv())
    table = count_flops(graph, (2, 5, 5), by_layer=True)
    assert table["type"].tolist() == ["conv2d", "relu"] and table["layer"].tolist() == ["conv2d", "relu"]
    assert table["flops"].tolist() == [4 * 2 * 3 * 3 * 3 * 3, 0]
    assert count_flops(graph, (2, 5, 5)) == count_flops(_FunctionalConv(), (2, 5, 5))


class _FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight))


class _ResidualDepthwise(nn.Module):
    """An expand convolution with its depthwise follower, a projection added to a 1x1 shortcut, a reader."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)
        self.shortcut = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(4, 6, 1, stride=2)

    def forward(self, x):
        stream = self.project(self.depthwise(F.relu(self.expand(x)))) + self.shortcut(x)
        return self.out(F.relu(stream))


def test_filter_flops_counts_own_followers_and_readers():
    model = _ResidualDepthwise().train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flops = filter_flops(model, (3, 8, 8))
    # Per filter at 8x8: expand 3x3x3x64 = 1728, depthwise 3x3x64 = 576, project 8x64 = 512, shortcut 3x64 = 192;
    # per input channel: project 4x64 = 256, out (4x4 output) 6x16 = 96; out's own filters 4x16 = 64.
    assert flops.to_dict() == {
        "expand": 1728 + 576 + 256,
        "depthwise": 576 + 256,
        "project": 512 + 96,
        "shortcut": 192 + 96,
        "out": 64.0,
    }
    # What the filters cost adds up to the convolutions' FLOPs counted once per filter and reader.
    assert count_flops(model, (3, 8, 8)) == 8 * 1728 + 8 * 576 + 4 * 512 + 4 * 192 + 6 * 64
    assert model.training and all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_filter_flops_equal_what_removing_a_filter_saves_in_a_chain():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2), nn.ReLU(), nn.Conv2d(5, 2, 1))
    flops = filter_flops(model, (3, 17, 17))
    for index, name in [(0, "0"), (2, "2")]:
        smaller = nn.Sequential(*[
            nn.Conv2d(m.in_channels - (i == index + 2), m.out_channels - (i == index), m.kernel_size, m.stride)
            if isinstance(m, nn.Conv2d) else m
            for i, m in enumerate(model)
        ])
        assert flops[name] == count_flops(model, (3, 17, 17)) - count_flops(smaller, (3, 17, 17))


def test_filter_flops_rejects_a_bad_input_shape():
    with pytest.raises(TypeError, match="input_shape must be a non-empty tuple"):
        filter_flops(nn.Conv2d(3, 4, 3), 32)
