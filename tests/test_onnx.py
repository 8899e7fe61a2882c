"""save_onnx: pruned networks exported to ONNX compute what torch computes, in onnxruntime."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_craft import CraftPruner, save_onnx
from sklearn_craft.models import mobilenet_v1, resnet18, vgg16
from sklearn_craft.surgery import coupled_groups, prune_channels, truncate


def _onnxruntime():
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def _half_of_every_group(model, example):
    """Keep the even-numbered filters of every group of coupled convolutions."""
    modules = dict(model.named_modules())
    keep = {}
    for group in coupled_groups(model, example):
        keep.update({name: list(range(0, modules[group[0]].out_channels, 2)) for name in group})
    return keep


def _craft_pruner_output():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(),
    )
    X = np.random.default_rng(0).random((60, 1, 16, 16), dtype=np.float32)
    y = X[:, 0, :8].mean(axis=(1, 2))
    return CraftPruner(model, gamma=0.1, finetune_params=None, random_state=0).fit(X, y).pruned_model_, (1, 16, 16)


def _truncated_graph_with_head():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    body = truncate(vgg16(num_classes=3, input_size=32, width_mult=0.125, batch_norm=True).eval(), "features.20", x)
    assert isinstance(body, torch.fx.GraphModule)
    return nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(body(x).shape[1], 2)), (3, 32, 32)


def _pruned(constructor, shape):
    torch.manual_seed(0)
    model = constructor().eval()
    example = torch.rand(1, *shape)
    return prune_channels(model, _half_of_every_group(model, example), example), shape


PRUNED_NETWORKS = {
    "craft_pruner": _craft_pruner_output,
    "truncated_graph": _truncated_graph_with_head,
    "mobilenet_v1": lambda: _pruned(lambda: mobilenet_v1(num_classes=3, width_mult=0.25), (3, 32, 32)),
    "resnet18": lambda: _pruned(lambda: resnet18(num_classes=3, width_mult=0.125), (3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PRUNED_NETWORKS)
def test_onnxruntime_computes_what_torch_computes(tmp_path, capsys, name):
    onnxruntime = _onnxruntime()
    model, shape = PRUNED_NETWORKS[name]()
    model.train()
    flags = [m.training for m in model.modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    capsys.readouterr()
    path = save_onnx(model, tmp_path / "pruned.onnx", input_shape=shape)
    assert capsys.readouterr().out == ""
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [("input", list(shape))]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic, dynamic batch dimension
    model.eval()
    for batch in (1, 3):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        (output,) = session.run(["output"], {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert output.shape == expected.shape
        np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_unexportable_model_is_a_clear_error(tmp_path):
    _onnxruntime()

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ValueError, match="DataDependent cannot be exported to ONNX"):
        save_onnx(DataDependent(), tmp_path / "m.onnx", input_shape=(3,))
    assert not (tmp_path / "m.onnx").exists()


def test_arguments_are_checked_before_exporting(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        save_onnx("model", tmp_path / "m.onnx", input_shape=(3,))
    with pytest.raises(TypeError, match="path must be a str or path-like, got int"):
        save_onnx(model, 3, input_shape=(3,))
    with pytest.raises(ValueError, match="path must be in an existing folder"):
        save_onnx(model, tmp_path / "absent" / "m.onnx", input_shape=(3,))
    with pytest.raises(ValueError, match="save_onnx needs example_input or input_shape: Linear does not record"):
        save_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="one of example_input and input_shape, got both"):
        save_onnx(model, tmp_path / "m.onnx", example_input=torch.rand(1, 3), input_shape=(3,))


def test_missing_exporter_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"needs the packages \['onnxscript'\].*sklearn_craft\[onnx\]"):
        save_onnx(nn.Linear(3, 2), tmp_path / "m.onnx", input_shape=(3,))
    assert not (tmp_path / "m.onnx").exists()
