"""The CUDA path: a CPU model fitted with ``device="cuda"``, and a model already on a GPU.

Skipped without a GPU (CI has none); run on a lent GPU machine. Convolutions run without TF32
here, so that the GPU's float32 sums differ from the CPU's by rounding only and the selections
can be compared exactly.
"""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sklearn_craft.finetune import finetune, recalibrate_batchnorm
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.pruner import CraftPruner

from conftest import conv_chain, trainable_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

#: Every stage of a fit: sequential selection, compensation, the best layer's satellite head, calibrated.
PARAMS = dict(
    gamma=0.05, selection="sequential", compensate=True, head="satellite", head_layer="best", calibrate_head=True,
    random_state=0,
)


@pytest.fixture(autouse=True)
def _no_tf32():
    # torch.backends' flags are read through __getattr__, which monkeypatch cannot undo.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def data():
    X = np.random.default_rng(0).random((160, 1, 16, 16), dtype=np.float32)
    y = (X[:, 0, :8].mean(axis=(1, 2)) > X[:, 0, 8:].mean(axis=(1, 2))).astype(np.int64)
    return X, y


def _state(model):
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def _assert_same_state(model, state):
    assert _state(model).keys() == state.keys()
    for name, value in _state(model).items():
        assert torch.equal(value, state[name]), name


def test_pooling_on_the_gpu_equals_pooling_on_the_cpu(data):
    X, _ = data
    model = conv_chain()
    expected = ActivationPooler(conv_chain()).fit(X).transform(X)
    features = ActivationPooler(model, device="cuda").fit(X).transform(X)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert next(model.parameters()).device.type == "cpu"


def test_a_cpu_model_fitted_on_the_gpu_selects_what_the_cpu_selects(data):
    X, y = data
    model = conv_chain()
    state = _state(model)
    reference = CraftPruner(conv_chain(), **PARAMS).fit(X, y)
    pruner = CraftPruner(model, device="cuda", **PARAMS).fit(X, y)

    _assert_same_state(model, state)
    assert next(model.parameters()).device.type == "cpu"
    assert next(pruner.pruned_model_.parameters()).device.type == "cuda"
    assert pruner.keep_ == reference.keep_
    assert pruner.head_layer_ == reference.head_layer_
    np.testing.assert_allclose(pruner.decision_function(X), reference.decision_function(X), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(pruner.report_.loc["flops"], reference.report_.loc["flops"])


def test_a_model_on_the_gpu_is_fine_tuned_there_and_left_alone(data):
    X, y = data
    model = conv_chain().cuda()
    state = _state(model)
    finetune_params = {"epochs": 3, "monitor": "accuracy", "validation_fraction": 0.25, "early_stopping": 3}
    pruner = CraftPruner(model, device="cuda", finetune_params=finetune_params, **PARAMS).fit(X, y)

    _assert_same_state(model, state)
    assert next(model.parameters()).device.type == "cuda"
    assert np.isfinite(pruner.history_["val_loss"]).all() and np.isfinite(pruner.history_["train_loss"][1:]).all()
    # predict is the pruned network's forward pass, read back from the GPU.
    pruned = copy.deepcopy(pruner.pruned_model_).eval()
    with torch.no_grad():
        logits = pruned(torch.from_numpy(X).cuda()).cpu().numpy().reshape(len(X), -1)
    labels = (logits[:, 0] > 0).astype(np.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)
    np.testing.assert_array_equal(pruner.predict(X), pruner.classes_[labels])
    # The untrained network is the CPU fit's: the same selection, head and temperature.
    reference = CraftPruner(conv_chain(), finetune_params=finetune_params, **PARAMS).fit(X, y)
    assert pruner.keep_ == reference.keep_
    assert pruner.head_temperature_ == pytest.approx(reference.head_temperature_, rel=1e-3)
    np.testing.assert_array_equal(pruner.predict_before_finetune(X), reference.predict_before_finetune(X))


def test_a_pruner_fitted_on_the_gpu_pickles_and_loads_without_one(data, tmp_path):
    X, y = data
    pruner = CraftPruner(conv_chain().cuda(), device="cuda", **PARAMS).fit(X, y)
    pooler = ActivationPooler(conv_chain().cuda(), device="cuda").fit(X)
    restored = pickle.loads(pickle.dumps(pruner))
    for network in (restored.model, restored.pruned_model_, restored.pruned_model_before_finetune_):
        assert next(network.parameters()).device.type == "cuda"
    assert next(pruner.pruned_model_.parameters()).device.type == "cuda"
    np.testing.assert_array_equal(restored.decision_function(X), pruner.decision_function(X))

    # A process that sees no GPU loads them on the CPU and predicts there.
    (tmp_path / "fitted.pkl").write_bytes(pickle.dumps((pruner, pooler)))
    np.save(tmp_path / "X.npy", X)
    script = (
        "import pickle, sys, numpy as np, torch\n"
        "assert not torch.cuda.is_available()\n"
        f"pruner, pooler = pickle.loads(open({str(tmp_path / 'fitted.pkl')!r}, 'rb').read())\n"
        "assert next(pruner.pruned_model_.parameters()).device.type == 'cpu'\n"
        f"X = np.load({str(tmp_path / 'X.npy')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, pruner.set_params(device='cpu').decision_function(X))\n"
        f"np.save({str(tmp_path / 'pooled.npy')!r}, pooler.set_params(device='cpu').transform(X))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parent)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), pruner.decision_function(X), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "pooled.npy"), pooler.transform(X), rtol=1e-4, atol=1e-5)


def test_fine_tuning_on_the_gpu_leaves_the_global_generators_alone(data):
    X, y = data
    model = trainable_net(n_outputs=2, dropout=0.5)
    cpu_state, gpu_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    finetune(model, X, y, loss="cross_entropy", epochs=2, device="cuda", random_state=3)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), gpu_state)


def test_finetune_and_recalibration_run_on_the_gpu(data):
    X, y = data
    model = trainable_net(n_outputs=2)
    history = finetune(model, X, y, loss="cross_entropy", epochs=5, lr=1e-2, device="cuda", random_state=0)
    assert next(model.parameters()).device.type == "cuda"
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]

    expected = recalibrate_batchnorm(conv_chain(), X)
    recalibrated = recalibrate_batchnorm(conv_chain(), X, device="cuda")
    bn, expected_bn = recalibrated[1], expected[1]
    np.testing.assert_allclose(bn.running_mean.cpu(), expected_bn.running_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.cpu(), expected_bn.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_another_gpu_is_copied_to_the_current_one(data):
    X, _ = data
    expected = ActivationPooler(conv_chain()).fit(X).transform(X)
    model = conv_chain().to("cuda:1")
    features = ActivationPooler(model, device="cuda").fit(X).transform(X)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert next(model.parameters()).device == torch.device("cuda:1")
