import doctest

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import sklearn_craft.images
from sklearn_craft.images import as_image_dataset, input_channels, iter_batches


class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _uint8_images(n=7, size=5, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _to_tensor(images):
    """torchvision's ToTensor on a batch: channels first, float, divided by 255."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def _all(dataset, batch_size=3, **kwargs):
    return torch.cat(list(iter_batches(dataset, batch_size, **kwargs)))


def test_uint8_channels_last_is_converted_like_to_tensor():
    images = _uint8_images()
    dataset = as_image_dataset(images, n_channels=3)
    expected = _to_tensor(images)
    assert torch.equal(_all(dataset), expected)
    assert torch.equal(dataset[4], expected[4])
    assert dataset[4].dtype == torch.float32


def test_every_format_gives_the_same_batches():
    images = _uint8_images()
    expected = _to_tensor(images)
    inputs = {
        "float64 numpy": expected.double().numpy(),
        "float32 numpy": expected.numpy(),
        "float tensor": expected,
        "uint8 tensor": torch.from_numpy(images).permute(0, 3, 1, 2),
        "Dataset of x": _ListDataset(list(expected)),
        "Dataset of (x, y)": TensorDataset(expected, torch.arange(len(images))),
        "Dataset of uint8 HWC arrays": _ListDataset(list(images)),
    }
    for label, X in inputs.items():
        assert torch.equal(_all(as_image_dataset(X, n_channels=3)), expected), label


def test_batches_are_copies_so_preprocess_may_edit_them_in_place():
    X = np.zeros((4, 1, 2, 2), dtype=np.float32)
    for batch in iter_batches(X, 2, preprocess=lambda batch: batch.add_(1)):
        assert torch.all(batch == 1)
    assert np.all(X == 0)


def test_iter_batches_sizes_order_indices_and_preprocess():
    X = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    batches = list(iter_batches(X, 4, preprocess=lambda batch: batch * 2))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(10.0) * 2)
    indices = [9, 0, 4, 4, 7]
    for data in (X, _ListDataset(list(torch.from_numpy(X)))):
        picked = torch.cat(list(iter_batches(data, 2, indices=indices))).flatten()
        assert picked.tolist() == [9.0, 0.0, 4.0, 4.0, 7.0]


def test_as_image_dataset_returns_its_own_result_unchanged():
    dataset = as_image_dataset(_uint8_images())
    assert as_image_dataset(dataset) is dataset


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((3, 4, 4), dtype=np.float32), "must be a 4-D array"),
        (np.zeros((2, 1, 3, 4, 4), dtype=np.float32), "must be a 4-D array"),
        (torch.zeros(5), "must be a 4-D array"),
        (np.zeros((2, 4, 4, 1), dtype=np.uint8), "has 1 channels, the model expects n_channels=3"),
        (np.zeros((2, 4, 4, 3), dtype=np.float32), "has 4 channels, the model expects n_channels=3"),
        (torch.zeros(2, 1, 4, 4), "has 1 channels"),
        (np.zeros((0, 3, 4, 4), dtype=np.float32), "is empty"),
        (np.zeros((2, 3, 0, 4), dtype=np.float32), "is empty"),
        (np.zeros((2, 3, 4, 4), dtype=np.int64), "float or uint8 pixels, got dtype int64"),
        (np.zeros((2, 3, 4, 4), dtype=bool), "float or uint8 pixels"),
        (_ListDataset([]), "is empty"),
        (_ListDataset([torch.zeros(4, 4)]), r"X\[0\] must be a 3-D image"),
        (_ListDataset([torch.zeros(1, 4, 4)]), r"X\[0\] has 1 channels"),
        (_ListDataset([np.zeros((4, 4, 3), dtype=np.int32)]), "float or uint8 pixels"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(X, message):
    with pytest.raises(ValueError, match=message):
        as_image_dataset(X, n_channels=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_rejected_up_front(bad):
    X = np.zeros((3, 3, 4, 4))
    X[2, 1, 0, 3] = bad
    for data in (X, X.astype(np.float32), torch.from_numpy(X)):
        with pytest.raises(ValueError, match="images contains NaN or infinity"):
            as_image_dataset(data, name="images")


def test_huge_finite_values_are_not_mistaken_for_infinity():
    X = np.full((2, 3, 4, 4), np.finfo(np.float64).max)
    assert len(as_image_dataset(X)) == 2


def test_non_finite_dataset_items_are_rejected_batch_by_batch():
    items = [torch.zeros(3, 4, 4) for _ in range(6)]
    items[4] = items[4].clone()
    items[4][0, 0, 0] = np.nan
    dataset = as_image_dataset(_ListDataset(items), name="faces")
    batches = iter_batches(dataset, 2)
    assert torch.equal(next(batches), torch.zeros(2, 3, 4, 4))
    next(batches)
    with pytest.raises(ValueError, match=r"faces contains NaN or infinity \(among items \[4, 5\]\)"):
        next(batches)


def test_dataset_images_of_different_shapes_are_rejected():
    dataset = as_image_dataset(_ListDataset([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)]))
    with pytest.raises(ValueError, match="must all have the same shape"):
        list(iter_batches(dataset, 2))


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 4, 4)


class _NoLength(Dataset):
    def __getitem__(self, index):
        return torch.zeros(3, 4, 4)


@pytest.mark.parametrize("X", [[np.zeros((3, 4, 4))], "images", _Stream(), _NoLength()])
def test_unsupported_types_raise_type_error(X):
    with pytest.raises(TypeError, match="X must be"):
        as_image_dataset(X)


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_iter_batches_rejects_bad_batch_size(batch_size, error):
    with pytest.raises(error, match="batch_size"):
        next(iter_batches(np.zeros((2, 1, 2, 2)), batch_size))


def test_iter_batches_progress_bar_goes_to_stderr(capsys):
    list(iter_batches(np.zeros((5, 1, 2, 2)), 2, progress=True, desc="scanning"))
    err = capsys.readouterr().err
    assert "scanning" in err and "3/3" in err
    list(iter_batches(np.zeros((5, 1, 2, 2)), 2, progress=False, desc="scanning"))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- DataLoaders and workers


class _Labelled(Dataset):
    """H×W×C uint8 numpy images with their index as label, as a lazy loader's items."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def test_dataloader_is_iterated_as_given_and_read_in_any_order_through_its_dataset():
    images = _uint8_images(n=10)
    expected = _to_tensor(images)
    tensors = TensorDataset(expected, torch.arange(10))
    for loader in [
        DataLoader(_Labelled(images), batch_size=4),  # default collate: N×H×W×C uint8 tensors
        DataLoader(_Labelled(images), batch_size=4, collate_fn=lambda items: np.stack([x for x, _ in items])),
        DataLoader(tensors, batch_size=3, num_workers=2),
        DataLoader(tensors, batch_sampler=[[0, 1], [2, 3, 4, 5, 6], [7], [8, 9]]),
    ]:
        dataset = as_image_dataset(loader, n_channels=3)
        assert len(dataset) == 10 and torch.equal(dataset[7], expected[7])
        sizes = [len(batch) for batch in iter_batches(dataset, 3)]
        assert sizes == [len(batch) for batch in loader.batch_sampler]  # the DataLoader's batches
        assert torch.equal(_all(dataset), expected)
        assert torch.equal(_all(dataset, indices=[9, 0, 4, 4, 2]), expected[[9, 0, 4, 4, 2]])
    # Samples follow the sampler, not the Dataset: a subset in another order.
    subset = DataLoader(tensors, batch_size=2, sampler=[8, 1, 5])
    assert len(as_image_dataset(subset)) == 3
    assert torch.equal(_all(subset), expected[[8, 1, 5]])
    assert torch.equal(_all(subset, indices=[2, 0]), expected[[5, 8]])


@pytest.mark.parametrize(
    "loader, error, message",
    [
        (
            DataLoader(TensorDataset(torch.zeros(4, 3, 4, 4)), shuffle=True),
            ValueError,
            "shuffling sampler RandomSampler",
        ),
        (
            DataLoader(TensorDataset(torch.zeros(4, 3, 4, 4)), sampler=torch.utils.data.SubsetRandomSampler([0, 1])),
            ValueError,
            "shuffle=False",
        ),
        (DataLoader(_Stream(), batch_size=2), TypeError, "IterableDataset _Stream"),
        (DataLoader(TensorDataset(torch.zeros(4, 3, 4, 4)), batch_size=None), TypeError, "batch_size=None"),
        (DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4))), ValueError, "yields no sample"),
        (
            DataLoader(TensorDataset(torch.zeros(4, 2, 4, 4))),
            ValueError,
            r"X \(the batch of samples 0..0\) has 2 channels",
        ),
        (DataLoader(_ListDataset([{"x": torch.zeros(3, 4, 4)}])), TypeError, "got dict"),
        (DataLoader(TensorDataset(torch.zeros(4, 4, 4))), ValueError, "4-D batch"),
        (DataLoader(TensorDataset(torch.zeros(4, 3, 4, 4, dtype=torch.int32))), ValueError, "float or uint8"),
    ],
)
def test_unusable_dataloaders_are_refused_up_front(loader, error, message):
    with pytest.raises(error, match=message):
        as_image_dataset(loader, n_channels=3)


def test_dataloader_batches_are_checked_one_by_one():
    images = torch.zeros(6, 3, 4, 4)
    images[4, 0, 0, 0] = np.inf
    dataset = as_image_dataset(DataLoader(TensorDataset(images), batch_size=2), name="faces")
    batches = iter_batches(dataset, 2)
    next(batches), next(batches)
    with pytest.raises(ValueError, match=r"faces \(the batch of samples 4..5\) contains NaN or infinity"):
        next(batches)
    dropping = DataLoader(
        TensorDataset(torch.zeros(6, 3, 4, 4)),
        batch_size=3,
        collate_fn=lambda items: torch.stack([x for (x,) in items[:2]]),
    )
    with pytest.raises(ValueError, match="holds 2 images, its batch sampler gave 3"):
        list(iter_batches(as_image_dataset(dropping), 3))


@pytest.mark.parametrize("indices", [None, [5, 0, 3, 3]])
def test_num_workers_read_a_dataset_in_processes_with_the_same_batches(indices):
    images = _uint8_images(n=11)
    dataset = _Labelled(images)
    expected = list(iter_batches(dataset, 4, indices=indices))
    batches = list(iter_batches(dataset, 4, indices=indices, num_workers=2))
    assert len(batches) == len(expected) and all(torch.equal(a, b) for a, b in zip(batches, expected))
    # The caller's random state is not drawn from to seed the workers.
    torch.manual_seed(0)
    draw = torch.rand(3)
    torch.manual_seed(0)
    list(iter_batches(dataset, 4, num_workers=2))
    assert torch.equal(torch.rand(3), draw)


def test_num_workers_report_bad_items_as_in_process():
    items = [torch.zeros(3, 4, 4) for _ in range(6)]
    items[4] = torch.full((3, 4, 4), np.nan)
    with pytest.raises(ValueError, match=r"faces contains NaN or infinity \(among items \[4, 5\]\)"):
        list(iter_batches(as_image_dataset(_ListDataset(items), name="faces"), 2, num_workers=2))


@pytest.mark.parametrize("num_workers, error", [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_iter_batches_rejects_bad_num_workers(num_workers, error):
    with pytest.raises(error, match="num_workers"):
        next(iter_batches(np.zeros((2, 1, 2, 2)), 1, num_workers=num_workers))


def test_input_channels_is_in_channels_of_the_first_conv():
    model = nn.Sequential(nn.Flatten(0, 0), nn.Conv2d(5, 2, 1), nn.Conv2d(2, 7, 1))
    assert input_channels(model) == 5
    with pytest.raises(ValueError, match="must contain an nn.Conv2d"):
        input_channels(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        input_channels("vgg16")


def test_docstring_examples_run():
    results = doctest.testmod(sklearn_craft.images)
    assert results.attempted > 0 and results.failed == 0
