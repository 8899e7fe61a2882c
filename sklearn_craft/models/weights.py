"""Safe loading of pretrained weights into the architectures of :mod:`sklearn_craft.models`."""

import os
import warnings
from collections.abc import Mapping

import torch

__all__ = ["load_weights"]

#: Entries under which training scripts commonly nest the state dict in a checkpoint.
_NESTED_KEYS = ("state_dict", "net_state_dict")
_PREFIX = "module."


def _unwrap(checkpoint, path):
    """The state dict inside ``checkpoint``: itself, or its ``state_dict`` / ``net_state_dict`` entry."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    for key in _NESTED_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    not_tensors = sorted(str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{os.fspath(path)!r} is not a state dict: entries {not_tensors[:5]} are not tensors "
            f"(expected a state dict, or a checkpoint with one of the entries {list(_NESTED_KEYS)})"
        )
    # DataParallel / DistributedDataParallel save every name with a "module." prefix.
    if checkpoint and all(str(k).startswith(_PREFIX) for k in checkpoint):
        checkpoint = {k[len(_PREFIX) :]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def load_weights(model, path, *, strict=True, transform=None):
    """Load a state dict from a file into ``model`` without unpickling code.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``, so only
    tensors and plain containers are accepted; nothing is downloaded.

    Parameters
    ----------
    model : torch.nn.Module
        The network to fill, modified in place (build it with the constructor whose layout the
        checkpoint matches, e.g. ``vgg16(num_classes=2622)``).
    path : str or path-like
        A file holding either a state dict or a checkpoint dict with the state dict under
        ``"state_dict"`` or ``"net_state_dict"``. A ``"module."`` prefix on every key (saved
        from ``DataParallel``) is removed.
    strict : bool, default=True
        When True, every parameter and buffer of ``model`` must be in the file with the same
        shape and the file must hold nothing else. When False, only the entries whose name and
        shape match are loaded and a ``UserWarning`` lists what was skipped (e.g. a classifier
        of another ``num_classes``).
    transform : callable or None, default=None
        Applied to the unwrapped state dict before it is matched to ``model``: a function
        ``dict -> dict`` to rename keys or convert layouts of a foreign checkpoint.

    Returns
    -------
    model : torch.nn.Module
        The same ``model``, with the loaded weights.

    Raises
    ------
    ValueError
        If the file is not a state dict, or (``strict=True``) when keys are missing or
        unexpected or shapes differ; the message lists them all.

    Examples
    --------
    >>> import tempfile, torch
    >>> from sklearn_craft.models import load_weights, resnet18
    >>> source = resnet18(num_classes=2)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     torch.save({"state_dict": source.state_dict()}, f"{tmp}/ckpt.pt")
    ...     model = load_weights(resnet18(num_classes=2), f"{tmp}/ckpt.pt")
    >>> torch.equal(model.fc.weight, source.fc.weight)
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    state_dict = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    if transform is not None:
        state_dict = transform(state_dict)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    shapes = [f"{k} {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in reshaped]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems and strict:
        raise ValueError(
            f"the weights in {os.fspath(path)!r} do not match {type(model).__name__}; " + "; ".join(problems)
        )
    if problems:
        warnings.warn(f"load_weights(strict=False) skipped {'; '.join(problems)}", UserWarning, stacklevel=2)
        skipped = set(unexpected) | set(reshaped)
        state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    model.load_state_dict(state_dict, strict=not problems)
    return model
