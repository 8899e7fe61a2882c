import json
import zipfile

import pytest
import torch
import torch.fx
from torch import nn

from sklearn_craft.export import load_model, save_model
from sklearn_craft.models import lightcnn9, vgg16
from sklearn_craft.surgery import prune_channels, truncate

from conftest import ARCHITECTURES


def _assert_round_trip(model, path, shape, **save_kwargs):
    """Save, load and compare outputs for batches of 1, 2 and 5; return the loaded module."""
    save_model(model, path, **save_kwargs)
    loaded = load_model(path)
    model.eval()
    for batch in (1, 2, 5):
        x = torch.rand(batch, *shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), batch
    return loaded


def _narrow_net():
    # Widths no constructor of the library produces: only the saved graph knows them.
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 5, 3, groups=5),
        nn.Conv2d(5, 3, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 7),
        nn.Dropout(0.5),
        nn.Linear(7, 2),
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_round_trip_of_library_architectures(tmp_path, name):
    shape = ARCHITECTURES[name].input_shape
    _assert_round_trip(ARCHITECTURES[name].build(), tmp_path / "model.pt2", shape, input_shape=shape)


def test_round_trip_of_a_pruned_network(tmp_path):
    torch.manual_seed(0)
    model = lightcnn9(num_classes=3, input_size=32, width_mult=0.25).eval()
    x = torch.rand(2, 1, 32, 32)
    pruned = prune_channels(model, {"features.0.filter": [0, 3, 4], "features.7.conv.filter": [1, 2, 5]}, x)
    assert pruned.fc1.filter.in_features != model.fc1.filter.in_features
    loaded = _assert_round_trip(pruned, tmp_path / "pruned.pt2", (1, 32, 32), example_input=x)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_round_trip_of_a_truncated_graph_with_new_head(tmp_path):
    torch.manual_seed(0)
    model = vgg16(num_classes=3, input_size=32, width_mult=0.125).eval()
    x = torch.rand(2, 3, 32, 32)
    body = truncate(model, "features.12", x)
    assert isinstance(body, torch.fx.GraphModule)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(body(x).shape[1], 4))
    _assert_round_trip(nn.Sequential(body, head), tmp_path / "cut.pt2", (3, 32, 32), example_input=x[:1])


def test_loaded_model_is_frozen_in_eval_mode(tmp_path):
    model = _narrow_net()
    loaded = _assert_round_trip(model, tmp_path / "narrow.pt2", (3, 8, 8), input_shape=(3, 8, 8))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert loaded.eval() is loaded
    with pytest.raises(NotImplementedError, match="cannot be switched to training"):
        loaded.train()


def test_save_leaves_model_unchanged(tmp_path):
    model = _narrow_net().train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, tmp_path / "narrow.pt2", input_shape=(3, 8, 8))
    assert [m.training for m in model.modules()] == [True, True, False] + [True] * 8
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_example_arguments(tmp_path):
    model = _narrow_net()
    with pytest.raises(ValueError, match="needs example_input or input_shape.*got neither"):
        save_model(model, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="got both"):
        save_model(model, tmp_path / "m.pt2", example_input=torch.rand(1, 3, 8, 8), input_shape=(3, 8, 8))
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        save_model(model, tmp_path / "m.pt2", example_input=[[0.0]])
    with pytest.raises(ValueError, match=r"batch \(N, ...\) with N >= 1"):
        save_model(model, tmp_path / "m.pt2", example_input=torch.rand(0, 3, 8, 8))


def test_unexportable_model_is_a_clear_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot be exported by torch.export"):
        save_model(DataDependent(), tmp_path / "m.pt2", input_shape=(3,))


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_files_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(ValueError, match="not an archive written by save_model: unexpected entries"):
        load_model(path)
    (tmp_path / "text.pt2").write_text("not a model")
    with pytest.raises(ValueError, match="not a zip archive"):
        load_model(tmp_path / "text.pt2")
    assert not _UNPICKLED


def test_archive_with_pickled_weights_is_refused(tmp_path):
    source = tmp_path / "narrow.pt2"
    save_model(_narrow_net(), source, input_shape=(3, 8, 8))
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(tampered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    with pytest.raises(ValueError, match="as a pickled object; refusing to load it"):
        load_model(tampered)


def test_pruner_output_saves_without_an_example_input(tmp_path):
    from sklearn_craft.pruner import CraftPruner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
    X = torch.rand(40, 1, 10, 10)
    y = (X[:, 0, :5].mean(dim=(1, 2)) - X[:, 0, 5:].mean(dim=(1, 2))).numpy()
    for head, model in (("satellite", net), ("original", nn.Sequential(*net, nn.Flatten(), nn.Linear(800, 1)))):
        pruned = CraftPruner(model, gamma=0.1, head=head, random_state=0).fit(X, y).pruned_model_
        assert pruned.input_shape == (1, 10, 10)
        _assert_round_trip(pruned, tmp_path / f"{head}.pt2", (1, 10, 10))
    # An explicit shape still wins over the recorded one.
    with pytest.raises(ValueError, match=r"model cannot run on input_shape \(a batch of shape \(1, 1, 9\)\)"):
        save_model(pruned, tmp_path / "wrong.pt2", input_shape=(1, 9))
