"""Saving and loading pruned networks without pickled code.

A pruned network no longer matches the constructor of its class (its layers have other widths,
it may be a ``torch.fx.GraphModule`` cut by :func:`sklearn_craft.surgery.truncate`, or end with a
new head), so a state dict alone cannot rebuild it, and torch (>= 2.6) refuses to unpickle a whole
module by default. :func:`save_model` therefore captures the network's computation with
``torch.export`` (a graph of ATen operators plus its weights, with a dynamic batch dimension)
and :func:`load_model` rebuilds a module from that archive, after checking that it holds only
JSON and raw tensor data so that nothing is unpickled. :func:`save_onnx` writes the same
computation as an ONNX file, for deployment with onnxruntime or another ONNX runtime.
"""

import importlib.util
import io
import json
import os
import re
import types
import zipfile

import torch
from torch import nn

from .inspection import _evaluating
from .profiling import _check_input_shape

__all__ = ["load_model", "save_model", "save_onnx"]

#: Every file of an archive written by ``torch.export.save`` for a program without custom objects,
#: relative to the archive's root folder. Anything else (pickled payloads, custom objects,
#: legacy or compiled-artifact sections) is refused by ``load_model``.
_ARCHIVE_FILES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt|extra/[^/]+"
)
_PAYLOAD_CONFIGS = {
    "data/weights/model_weights_config.json": "weight_",
    "data/constants/model_constants_config.json": "tensor_",
}


def _example_batch(example_input, input_shape):
    """A batch of two examples, from ``example_input`` (its first example) or zeros of ``input_shape``."""
    if (example_input is None) == (input_shape is None):
        given = "neither" if example_input is None else "both"
        raise ValueError(f"give exactly one of example_input and input_shape, got {given}")
    if input_shape is not None:
        return torch.zeros((2, *_check_input_shape(input_shape)))
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.ndim < 2 or len(example_input) == 0:
        raise ValueError(
            f"example_input must be a batch (N, ...) with N >= 1, got shape {tuple(example_input.shape)}"
        )
    # torch.export specialises a dimension of size 1 to a constant, so the traced batch has two examples.
    return torch.cat([example_input[:1], example_input[:1]])


def save_model(model, path, *, example_input=None, input_shape=None):
    """Save a network so that :func:`load_model` rebuilds it without its Python class.

    The network is exported in eval mode with ``torch.export.export`` (batch dimension dynamic)
    and written with ``torch.export.save``. The example only fixes the shapes and dtype of the
    inputs; the saved network accepts any batch size >= 1 of examples of that shape.

    Parameters
    ----------
    model : torch.nn.Module
        The network, e.g. a pruned one; not modified (training flags are restored). Its
        ``forward`` must take one tensor and be traceable by ``torch.export`` (no
        data-dependent Python control flow).
    path : str or path-like
        Destination file (``.pt2`` by convention).
    example_input : torch.Tensor, optional
        A batch (N, ...) of inputs; only its first example is used.
    input_shape : tuple of int, optional
        Shape of one example without the batch dimension, e.g. ``(3, 112, 112)``, used instead of
        ``example_input`` (float32 zeros). Give exactly one of the two.

    Returns
    -------
    path : str
        The path written.

    Raises
    ------
    ValueError
        If neither or both of ``example_input`` and ``input_shape`` are given, or if the model
        cannot be exported with a dynamic batch dimension.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from sklearn_craft.export import load_model, save_model
    >>> model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_model(model, f"{tmp}/pruned.pt2", input_shape=(3, 8, 8))
    ...     loaded = load_model(path)
    >>> x = torch.rand(4, 3, 8, 8)
    >>> torch.equal(loaded(x), model.eval()(x))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    example = _example_batch(example_input, input_shape)
    batch = torch.export.Dim("batch", min=1)
    with _evaluating(model):
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:
            raise ValueError(
                f"{type(model).__name__} cannot be exported by torch.export with a dynamic batch dimension "
                f"for inputs of shape {tuple(example.shape[1:])}: {exc}"
            ) from exc
    torch.export.save(program, path)
    return os.fspath(path)


def save_onnx(model, path, *, example_input=None, input_shape=None):
    """Save a network as an ONNX file, for onnxruntime and other ONNX runtimes.

    The network is exported in eval mode by ``torch.onnx.export(..., dynamo=True)`` (which
    captures it with ``torch.export``, as :func:`save_model` does), with a dynamic batch
    dimension and its weights inside the file. The graph has one input named ``"input"`` and
    its first output is named ``"output"``. The example only fixes the shapes and dtype of the
    inputs; the saved network accepts any batch size >= 1 of examples of that shape.

    Needs the ``onnx`` and ``onnxscript`` packages (``pip install sklearn_craft[onnx]``, which
    also installs ``onnxruntime`` to run the file).

    Parameters
    ----------
    model : torch.nn.Module
        The network, e.g. a pruned one; not modified (training flags are restored). Its
        ``forward`` must take one tensor and be traceable by ``torch.export`` (no
        data-dependent Python control flow).
    path : str or path-like
        Destination file (``.onnx`` by convention), in an existing folder. The file holds the
        weights, so networks over 2 GB cannot be saved (the ONNX limit of one file).
    example_input : torch.Tensor, optional
        A batch (N, ...) of inputs; only its first example is used.
    input_shape : tuple of int, optional
        Shape of one example without the batch dimension, e.g. ``(3, 112, 112)``, used instead of
        ``example_input`` (float32 zeros). Give exactly one of the two.

    Returns
    -------
    path : str
        The path written.

    Raises
    ------
    ImportError
        If ``onnx`` or ``onnxscript`` is not installed.
    ValueError
        If neither or both of ``example_input`` and ``input_shape`` are given, if the folder of
        ``path`` does not exist, or if the model cannot be exported with a dynamic batch
        dimension.

    Examples
    --------
    >>> import tempfile, numpy as np, onnxruntime, torch
    >>> from torch import nn
    >>> from sklearn_craft.export import save_onnx
    >>> model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     session = onnxruntime.InferenceSession(save_onnx(model, f"{tmp}/pruned.onnx", input_shape=(3, 8, 8)))
    >>> x = torch.rand(4, 3, 8, 8)
    >>> (output,) = session.run(["output"], {"input": x.numpy()})
    >>> np.allclose(output, model.eval()(x).detach().numpy(), atol=1e-5)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path must be in an existing folder, got {os.fspath(path)!r} ({folder!r} does not exist)")
    example = _example_batch(example_input, input_shape)
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"save_onnx needs the packages {missing}, which are not installed: pip install 'sklearn_craft[onnx]'"
        )
    batch = torch.export.Dim("batch", min=1)
    with _evaluating(model):
        try:
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=["input"],
                output_names=["output"],
                external_data=False,
                verbose=False,
            )
        except Exception as exc:
            raise ValueError(
                f"{type(model).__name__} cannot be exported to ONNX with a dynamic batch dimension "
                f"for inputs of shape {tuple(example.shape[1:])}: {exc}"
            ) from exc
    return os.fspath(path)


def _check_archive(path):
    """Refuse files that ``torch.export.load`` could only read by unpickling something."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{os.fspath(path)!r} is not a file written by save_model (not a zip archive)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names}
        relative = {name.split("/", 1)[-1]: name for name in names}
        unexpected = sorted(r for r in relative if not _ARCHIVE_FILES.fullmatch(r))
        if len(roots) != 1 or unexpected or "models/model.json" not in relative:
            raise ValueError(
                f"{os.fspath(path)!r} is not an archive written by save_model"
                + (f": unexpected entries {unexpected[:5]}" if unexpected else "")
            )
        for config_name, prefix in _PAYLOAD_CONFIGS.items():
            if config_name not in relative:
                continue
            for key, payload in json.loads(archive.read(relative[config_name]))["config"].items():
                if payload.get("use_pickle", True) or not payload.get("path_name", "").startswith(prefix):
                    raise ValueError(f"{os.fspath(path)!r} stores {key!r} as a pickled object; refusing to load it")
        if "data/sample_inputs/model.pt" in relative:
            try:
                torch.load(io.BytesIO(archive.read(relative["data/sample_inputs/model.pt"])), weights_only=True)
            except Exception as exc:
                raise ValueError(f"{os.fspath(path)!r} holds sample inputs that are not plain tensors") from exc


def _train_in_eval_only(self, mode=True):
    """``nn.Module.train`` for an exported graph, whose operations were captured in eval mode."""
    if mode:
        raise NotImplementedError(
            "a model loaded by load_model runs its eval-mode computation (dropout off, batch-norm "
            "statistics fixed) and cannot be switched to training; fine-tune the model before saving it"
        )
    return nn.Module.train(self, False)


def load_model(path):
    """Load a network saved by :func:`save_model`.

    The archive is first checked to hold nothing but JSON and raw tensor data (a ``ValueError``
    is raised otherwise), then read with ``torch.export.load``.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save_model`.

    Returns
    -------
    model : torch.fx.GraphModule
        A module computing what the saved network computed in eval mode, for any batch size >=
        1. It is in eval mode; ``model.eval()`` works (and changes nothing) but ``model.train()``
        raises ``NotImplementedError``, because dropout and batch normalisation were captured in
        their eval behaviour. Its parameters are flat attributes rather than the original layer
        modules, so hook-based tools (pooling) do not see its layers;
        :func:`~sklearn_craft.profiling.count_flops` counts its graph.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from sklearn_craft.export import load_model, save_model
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 1))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = load_model(save_model(model, f"{tmp}/model.pt2", input_shape=(4,)))
    >>> loaded.training
    False
    >>> x = torch.rand(1, 4)
    >>> torch.equal(loaded(x), model.eval()(x))
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    _check_archive(path)
    module = torch.export.load(path).module()
    # ExportedProgram.module() forbids both train() and eval(); eval() is harmless (the graph
    # already computes in eval mode) and is what callers use before inference.
    del module.eval
    module.train = types.MethodType(_train_in_eval_only, module)
    return module.eval()
