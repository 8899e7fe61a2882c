"""Nothing sklearn_craft loads from a file or a cache folder may run code (issue 12, "Security")."""

import io
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sklearn_craft.export import load_model, save_model
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.selection import LassoFilterSelector

# ---------------------------------------------------------------- load_model


def _saved(tmp_path):
    """A genuine archive of a small network with a dynamic batch size (symbolic shapes in its graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return save_model(model, tmp_path / "genuine.pt2", input_shape=(3, 8, 8))


def _rewritten(source, target, edit=None, first=None):
    """Copy of the archive ``source`` with its program edited by ``edit`` and ``first`` entries written first."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name, data in (first or {}).items():
            copy.writestr(name, data)
        for item in original.infolist():
            data = original.read(item)
            if item.filename.endswith("models/model.json") and edit is not None:
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            copy.writestr(item, data)
    return target


def _payload(flag):
    """Python source that creates the folder ``flag`` when it is evaluated."""
    return f"__import__('os').mkdir({str(flag)!r})"


def _sizes(program):
    """Every symbolic size of the program's tensors."""
    for value in program["graph_module"]["graph"]["tensor_values"].values():
        for size in value["sizes"]:
            if "as_expr" in size:
                yield size["as_expr"]


@pytest.mark.parametrize(
    "expression",
    [
        "{payload} or {genuine}",
        "Mul(Integer(2), {genuine}).__class__.__init__.__globals__['os'].mkdir({flag!r})",
        "Integer(({payload}, 1)[1])",
        "Symbol({flag!r}) if {payload} else {genuine}",
        "Symbol('s0', **{{'positive': {payload}}})",
    ],
    ids=["or", "attribute", "nested", "conditional", "keywords"],
)
def test_load_model_never_evaluates_a_symbolic_shape_payload(tmp_path, expression):
    flag = tmp_path / "evaluated"

    def inject(program):
        size = next(_sizes(program))
        size["expr_str"] = expression.format(payload=_payload(flag), genuine=size["expr_str"], flag=str(flag))

    tampered = _rewritten(_saved(tmp_path), tmp_path / "tampered.pt2", inject)
    with pytest.raises(ValueError, match="symbolic-shape expression .* torch would evaluate it"):
        load_model(tampered)
    assert not flag.exists()


def test_load_model_accepts_the_shape_arithmetic_torch_writes(tmp_path):
    class Reshaping(nn.Module):
        """Sizes that are products of the batch size: Mul(Integer(144), Symbol(...)) in the graph."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.reshape(-1).view(x.size(0), -1) * (x.shape[0] * 2)

    model = Reshaping().eval()
    path = save_model(model, tmp_path / "reshaping.pt2", input_shape=(3, 8, 8))
    with zipfile.ZipFile(path) as archive:
        program = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("model.json"))))
    assert any(size["expr_str"].startswith("Mul(Integer(") for size in _sizes(program))
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(load_model(path)(x), model(x))


def test_load_model_refuses_a_range_constraint_that_is_not_a_shape_symbol(tmp_path):
    def inject(program):
        program["range_constraints"][_payload(tmp_path / "evaluated")] = {"min_val": 1, "max_val": None}

    with pytest.raises(ValueError, match="not a shape symbol"):
        load_model(_rewritten(_saved(tmp_path), tmp_path / "tampered.pt2", inject))


class _Unpickled:
    """Pickled object whose unpickling creates the folder ``flag``."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.mkdir, (self.flag,))


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_load_model_refuses_duplicate_entries_without_unpickling_either(tmp_path):
    source = _saved(tmp_path)
    flag = tmp_path / "unpickled"
    pickled = io.BytesIO()
    torch.save(((_Unpickled(flag),), {}), pickled)
    with zipfile.ZipFile(source) as archive:
        sample_inputs = next(name for name in archive.namelist() if name.endswith("data/sample_inputs/model.pt"))
    # torch's reader takes this first copy, zipfile the genuine last one.
    tampered = _rewritten(source, tmp_path / "tampered.pt2", first={sample_inputs: pickled.getvalue()})
    with pytest.raises(ValueError, match="several entries named .*sample_inputs/model.pt"):
        load_model(tampered)
    assert not flag.exists()


def test_load_model_never_runs_guard_code(tmp_path):
    flag = tmp_path / "executed"

    def inject(program):
        program["guards_code"] = [f"{_payload(flag)} is None"]

    model = load_model(_rewritten(_saved(tmp_path), tmp_path / "tampered.pt2", inject))
    assert model(torch.rand(3, 3, 8, 8)).shape == (3, 2)
    assert not flag.exists()


def test_load_model_never_imports_a_module_named_by_the_input_structure(tmp_path, monkeypatch):
    flag = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(
        f"import enum, os\nos.mkdir({str(flag)!r})\n\nclass Kind(enum.Enum):\n    A = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def inject(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps(
            [{"__enum__": True, "fqn": "planted_module:Kind", "name": "A"}]
        )
        signature["in_spec"] = json.dumps(spec)

    with pytest.raises(ValueError, match="input/output structure .* torch would import modules"):
        load_model(_rewritten(_saved(tmp_path), tmp_path / "tampered.pt2", inject))
    assert not flag.exists() and "planted_module" not in sys.modules


def test_load_model_refuses_calls_of_anything_but_aten_operators(tmp_path):
    def inject(program):
        node = next(node for node in program["graph_module"]["graph"]["nodes"] if "relu" in node["target"])
        node["target"] = "torch.os.system"

    with pytest.raises(ValueError, match="calls 'torch.os.system', which is not an ATen operator"):
        load_model(_rewritten(_saved(tmp_path), tmp_path / "tampered.pt2", inject))


def test_load_model_refuses_entries_torch_does_not_write(tmp_path):
    source = _saved(tmp_path)
    compressed = tmp_path / "compressed.pt2"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as copy:
        for item in original.infolist():
            copy.writestr(item.filename, original.read(item))
    with pytest.raises(ValueError, match="compressed entries"):
        load_model(compressed)


# ---------------------------------------------------------------- memory= caches


def _poison(path, kind, flag):
    """Overwrite the cache entry at ``path`` with data that would run code (mkdir ``flag``) if unpickled."""
    payload = _Unpickled(flag)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"features": payload}))
    elif kind == "object_npz":
        with path.open("wb") as file:
            np.savez(file, features=np.array([payload], dtype=object))
    elif kind == "object_npy":
        with path.open("wb") as file:
            np.save(file, np.array([payload], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(path.read_bytes()[:40])


def _cache_entries(folder):
    """Files of ``folder`` that hold cached results (whatever the storage format)."""
    return [path for path in Path(folder).rglob("*") if path.suffix in {".pkl", ".npy", ".npz"}]


class _Counting(nn.Module):
    """Identity counting the images it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return x


_POISONS = ["pickle", "object_npz", "object_npy", "truncated"]


@pytest.mark.parametrize("kind", _POISONS)
def test_a_poisoned_pooling_cache_entry_is_recomputed_never_unpickled(tmp_path, kind):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    torch.manual_seed(0)
    counter = _Counting()
    model = nn.Sequential(counter, nn.Conv2d(3, 4, 3), nn.ReLU())
    pooler = ActivationPooler(model, memory=str(tmp_path / "cache")).fit(images)
    expected = pooler.transform(images)
    entries = _cache_entries(tmp_path / "cache")
    assert entries
    flag = tmp_path / "unpickled"
    for entry in entries:
        _poison(entry, kind, flag)
    counter.seen = 0
    features = pooler.transform(images)
    assert not flag.exists()
    np.testing.assert_array_equal(features, expected)
    assert counter.seen == 6  # recomputed, and the entry repaired:
    np.testing.assert_array_equal(pooler.transform(images), expected)
    assert counter.seen == 6


@pytest.mark.parametrize("kind", _POISONS)
def test_a_poisoned_selection_cache_entry_is_recomputed_never_unpickled(tmp_path, kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6))
    y = X[:, 0] - X[:, 4] + 0.1 * rng.normal(size=60)
    # Groups of different widths: their paths are solved, and cached, apart.
    params = dict(groups=[0, 0, 0, 0, 1, 1], alphas=10, random_state=0)
    expected = LassoFilterSelector(**params).fit(X, y)
    LassoFilterSelector(**params, memory=str(tmp_path / "cache")).fit(X, y)
    entries = _cache_entries(tmp_path / "cache")
    assert len(entries) == 2
    flag = tmp_path / "unpickled"
    for entry in entries:
        _poison(entry, kind, flag)
    refit = LassoFilterSelector(**params, memory=str(tmp_path / "cache")).fit(X, y)
    assert not flag.exists()
    pd.testing.assert_frame_equal(refit.curves_, expected.curves_)
    np.testing.assert_array_equal(refit.coef_, expected.coef_)


def test_memory_location_and_concurrent_writers(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    counter = _Counting()
    model = nn.Sequential(counter, nn.Conv2d(3, 4, 3), nn.ReLU())
    expected = ActivationPooler(model).fit(images).transform(images)
    for memory in (None, joblib.Memory(None, verbose=0)):
        pooler = ActivationPooler(model, memory=memory).fit(images)
        counter.seen = 0
        pooler.transform(images), pooler.transform(images)
        assert counter.seen == 12  # no location: nothing is cached
    location = tmp_path / "joblib"
    pooler = ActivationPooler(model, memory=joblib.Memory(location, verbose=0)).fit(images)
    results = joblib.Parallel(n_jobs=4, prefer="threads")(joblib.delayed(pooler.transform)(images) for _ in range(8))
    for result in results:
        np.testing.assert_array_equal(result, expected)
    entries = [path for path in location.rglob("*") if path.is_file()]
    assert [path.suffix for path in entries] == [".npz"]  # one entry, no temporary file left behind


class _Shifted(nn.Module):
    """A convolution whose input depends on a non-persistent buffer and on a plain attribute."""

    def __init__(self, offset=0.0, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.register_buffer("offset", torch.full((1, 3, 1, 1), offset), persistent=False)
        self.scale = scale

    def forward(self, x):
        return self.act(self.conv(x * self.scale + self.offset))


@pytest.mark.parametrize("changed", [{"offset": 0.5}, {"scale": 3.0}], ids=["non-persistent buffer", "attribute"])
def test_models_differing_only_outside_the_state_dict_do_not_share_cache_entries(tmp_path, changed):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    first, second = _Shifted(), _Shifted(**changed)
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in first.state_dict().items())
    expected = ActivationPooler(second).fit(images).transform(images)
    assert not np.array_equal(expected, ActivationPooler(first).fit(images).transform(images))
    ActivationPooler(first, memory=str(tmp_path)).fit(images).transform(images)
    np.testing.assert_array_equal(
        ActivationPooler(second, memory=str(tmp_path)).fit(images).transform(images), expected
    )
    assert len(_cache_entries(tmp_path)) == 2


def test_a_forward_hook_is_part_of_the_cache_key(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    model = _Shifted()
    plain = ActivationPooler(model, memory=str(tmp_path)).fit(images).transform(images)
    handle = model.conv.register_forward_pre_hook(lambda module, inputs: inputs[0] + 1)
    try:
        hooked = ActivationPooler(model, memory=str(tmp_path)).fit(images).transform(images)
    finally:
        handle.remove()
    np.testing.assert_allclose(hooked, ActivationPooler(_Shifted(offset=1.0)).fit(images).transform(images), rtol=1e-6)
    assert not np.array_equal(hooked, plain)


# ---------------------------------------------------------------- decoded-image caches of the loaders


@pytest.mark.parametrize("kind", [*_POISONS, "object_npz_named_npy"])
def test_a_poisoned_image_cache_file_is_rebuilt_never_unpickled(tmp_path, kind):
    from PIL import Image

    from sklearn_craft.datasets import load_utkface

    root = tmp_path / "utkface"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(root / f"{20 + i}_0_1_2017{i}.jpg")
    cache = tmp_path / "cache"
    expected, _ = load_utkface(root, size=(8, 8), cache=cache)
    expected = np.array(expected)
    (entry,) = cache.glob("utkface-*.npy")
    flag = tmp_path / "unpickled"
    _poison(entry, "object_npz" if kind == "object_npz_named_npy" else kind, flag)
    images, _ = load_utkface(root, size=(8, 8), cache=cache)
    assert not flag.exists()
    np.testing.assert_array_equal(images, expected)
    # Rebuilt in place: a plain uint8 array again, read back without allowing pickles.
    np.testing.assert_array_equal(np.load(entry, allow_pickle=False), expected)
