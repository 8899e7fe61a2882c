"""Saving and loading pruned networks without pickled code.

A pruned network no longer matches the constructor of its class (its layers have other widths,
it may be a ``torch.fx.GraphModule`` cut by :func:`sklearn_craft.surgery.truncate`, or end with a
new head), so a state dict alone cannot rebuild it, and torch (>= 2.6) refuses to unpickle a whole
module by default. :func:`save_model` therefore captures the network's computation with
``torch.export`` (a graph of ATen operators plus its weights, with a dynamic batch dimension)
and :func:`load_model` rebuilds a module from that archive, after checking that it holds only
JSON and raw tensor data, and that torch will find nothing in it to unpickle, evaluate or import.
:func:`save_onnx` writes the same computation as an ONNX file, for deployment with onnxruntime
or another ONNX runtime.
"""

import ast
import importlib.util
import io
import itertools
import json
import os
import re
import types
import zipfile
from collections import Counter

import torch
from torch import nn

from .inspection import _evaluating, _input_dtype, _runs_on
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
    if example_input is not None and input_shape is not None:
        raise ValueError("give at most one of example_input and input_shape, got both")
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


def _checked_example(model, path, example_input, input_shape, caller):
    """The example batch to export ``model`` with, once the arguments of ``caller`` are checked.

    With neither ``example_input`` nor ``input_shape``, the model's ``input_shape`` attribute (a
    CraftPruner's ``pruned_model_`` has one); the example goes where the model is, and zeros of
    ``input_shape`` take its dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"path must be in an existing folder, got {os.fspath(path)!r}: {folder!r} does not exist")
    if example_input is None and input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                f"{caller} needs example_input or input_shape: {type(model).__name__} does not record its "
                "input shape (only the pruned_model_ of a fitted CraftPruner does), got neither"
            )
    example = _example_batch(example_input, input_shape)
    parameter = next(itertools.chain(model.parameters(), model.buffers()), None)
    if parameter is not None:
        example = example.to(parameter.device, _input_dtype(model) if input_shape is not None else example.dtype)
    _runs_on(model, example[:1], "example_input" if input_shape is None else "input_shape")
    return example


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
        ``example_input`` (zeros of the dtype of the model's parameters). Give at most one of the
        two; with neither, the model's own ``input_shape`` attribute is used, which the
        ``pruned_model_`` of :class:`~sklearn_craft.pruner.CraftPruner` has.

    Returns
    -------
    path : str
        The path written.

    Raises
    ------
    ValueError
        If both of ``example_input`` and ``input_shape`` are given, or neither while the model
        has no ``input_shape`` attribute, if the model cannot run on them (an ``input_shape`` with
        a batch dimension, say), if the folder of ``path`` does not exist, or if the model cannot
        be exported with a dynamic batch dimension.

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
    example = _checked_example(model, path, example_input, input_shape, "save_model")
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
        ``example_input`` (zeros of the dtype of the model's parameters). Give at most one of the
        two; with neither, the model's own ``input_shape`` attribute is used, as by :func:`save_model`.

    Returns
    -------
    path : str
        The path written.

    Raises
    ------
    ImportError
        If ``onnx`` or ``onnxscript`` is not installed.
    ValueError
        If both of ``example_input`` and ``input_shape`` are given, or neither while the model
        has no ``input_shape`` attribute, if the model cannot run on them, if the folder of
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
    example = _checked_example(model, path, example_input, input_shape, "save_onnx")
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


#: Calls allowed in the expression strings of symbolic shapes. torch writes them as sympy's
#: ``srepr`` of integer arithmetic on the batch size, e.g.
#: ``Mul(Integer(144), Symbol('s77', positive=True, integer=True))``, and reads them with
#: ``sympy.sympify``, which evaluates the string as Python.
_SYMPY_CALLS = frozenset(
    {"Add", "Mul", "Integer", "FloorDiv", "CleanDiv", "CeilDiv", "Mod", "PythonMod", "Max", "Min"}
    | {"Eq", "Ne", "LessThan", "StrictLessThan", "GreaterThan", "StrictGreaterThan"}
)
_SYMBOL_ASSUMPTIONS = frozenset({"integer", "positive", "nonnegative", "real", "finite"})
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_MAX_EXPRESSION_LENGTH = 2000
#: Operators a graph node may call: ATen operators (C++ kernels) and the Python arithmetic of
#: symbolic sizes. torch resolves any other dotted name below ``torch``, ``math`` or
#: ``_operator`` to whatever callable it names.
_OPERATOR = re.compile(
    r"torch\.ops\.aten\.\w+\.\w+"
    r"|_operator\.(?:add|sub|mul|floordiv|mod|truediv|pow|neg|pos|eq|ne|lt|le|gt|ge|and_|or_)"
    r"|torch\.sym_(?:int|float|max|min|not|ite|sqrt)|math\.trunc",
    re.ASCII,
)
#: Containers of the input and output pytree specs. torch imports a module for other kinds
#: (enum and defaultdict contexts name one).
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
_ARCHIVE_ROOT = "archive"


def _is_shape_arithmetic(node):
    """Whether an expression tree is integer arithmetic on shape symbols (evaluating it runs nothing else)."""
    if isinstance(node, ast.Constant):
        return type(node.value) is int
    if isinstance(node, ast.Name):
        return _SYMBOL_NAME.fullmatch(node.id) is not None
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub) and _is_shape_arithmetic(node.operand)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITHMETIC) and _is_shape_arithmetic(node.left) and _is_shape_arithmetic(node.right)
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return False
    if node.func.id == "Symbol":
        name = node.args[0] if len(node.args) == 1 else None
        return (
            isinstance(name, ast.Constant)
            and isinstance(name.value, str)
            and _SYMBOL_NAME.fullmatch(name.value) is not None
            and all(
                keyword.arg in _SYMBOL_ASSUMPTIONS
                and isinstance(keyword.value, ast.Constant)
                and type(keyword.value.value) is bool
                for keyword in node.keywords
            )
        )
    return node.func.id in _SYMPY_CALLS and not node.keywords and all(map(_is_shape_arithmetic, node.args))


def _check_expression(text, where):
    """Refuse an expression string unless it is shape arithmetic, parsed here without evaluating it."""
    try:
        safe = (
            isinstance(text, str)
            and text.isascii()
            and len(text) <= _MAX_EXPRESSION_LENGTH
            and _is_shape_arithmetic(ast.parse(text, mode="eval").body)
        )
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        safe = False
    if not safe:
        raise ValueError(
            f"{where} holds the symbolic-shape expression {str(text)[:200]!r}, which is not integer "
            "arithmetic on shape symbols; torch would evaluate it as Python, so the file is refused"
        )


def _is_plain_treespec(spec):
    """Whether a pytree spec holds only tuples, lists and dicts keyed by strings or ints."""
    if not isinstance(spec, dict) or set(spec) != {"type", "context", "children_spec"}:
        return False
    if spec["type"] not in _TREESPEC_TYPES or not isinstance(spec["children_spec"], list):
        return False
    context = spec["context"]
    if context is not None:
        try:
            keys = json.loads(context) if isinstance(context, str) else context
        except ValueError:
            return False
        if keys is not None and not (isinstance(keys, list) and all(type(key) in (str, int) for key in keys)):
            return False
    return all(_is_plain_treespec(child) for child in spec["children_spec"])


def _check_treespec(text, where):
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        spec = None
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1 and _is_plain_treespec(spec[1])):
        raise ValueError(
            f"{where} holds the input/output structure {str(text)[:200]!r}, which is not made of tuples, "
            "lists and dicts; torch would import modules to read it, so the file is refused"
        )


def _check_operator(name, where):
    if not isinstance(name, str) or not _OPERATOR.fullmatch(name):
        raise ValueError(
            f"{where} calls {str(name)[:200]!r}, which is not an ATen operator; only ATen operators and "
            "shape arithmetic are loaded, so the file is refused"
        )


def _check_program(program, where):
    """Refuse a serialized program (models/model.json) holding strings torch would evaluate or import.

    torch's deserializer passes every ``expr_str`` (symbolic sizes, strides, integers and
    booleans) to ``sympy.sympify``, the pytree specs of the inputs and outputs to
    ``treespec_loads`` (which imports the modules named by enum and defaultdict contexts), the
    range-constraint names to its symbol table, and resolves node targets and operator
    arguments by attribute lookup. ``guards_code`` is Python source that
    ``ExportedProgram.module()`` would ``exec``; :func:`load_model` does not ask for it.
    """
    stack = [program]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str":
                    _check_expression(item, where)
                elif key in ("in_spec", "out_spec"):
                    _check_treespec(item, where)
                elif key in ("target", "as_operator") and isinstance(item, str):
                    _check_operator(item, where)
                else:
                    stack.append(item)
    ranges = program.get("range_constraints") if isinstance(program, dict) else None
    for name, bounds in ranges.items() if isinstance(ranges, dict) else ():
        limits = list(bounds.values()) if isinstance(bounds, dict) else [bounds]
        if not _SYMBOL_NAME.fullmatch(name) or not all(limit is None or type(limit) is int for limit in limits):
            raise ValueError(
                f"{where} constrains {name[:200]!r} to {str(bounds)[:200]}, not a shape symbol to integers"
            )


def _check_payloads(configs, where):
    """Refuse weights or constants stored as pickles (or custom objects, which are pickles too)."""
    for config_name, prefix in _PAYLOAD_CONFIGS.items():
        for key, payload in configs.get(config_name, {}).items():
            if (
                not isinstance(payload, dict)
                or payload.get("use_pickle", True)
                or not str(payload.get("path_name", "")).startswith(prefix)
            ):
                raise ValueError(f"{where} stores {key!r} as a pickled object; refusing to load it")


def _read_archive(path):
    """Every entry of an archive written by save_model, by its name below the root folder, read once.

    Entries are refused unless each name is one ``torch.export.save`` writes for a plain network,
    appears once, and is stored uncompressed (as torch writes them).
    """
    where = repr(os.fspath(path))
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{where} is not a file written by save_model (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            # zipfile reads the last entry of a repeated name, torch's reader may read another:
            # what was checked would not be what is loaded.
            repeated = sorted(name for name, count in Counter(name.lower() for name in names).items() if count > 1)
            if repeated:
                raise ValueError(f"{where} holds several entries named {repeated[:5]}; refusing to load it")
            roots = {name.split("/", 1)[0] for name in names}
            relative = [name.split("/", 1)[-1] for name in names]
            unexpected = sorted(name for name in relative if not _ARCHIVE_FILES.fullmatch(name))
            if len(roots) != 1 or unexpected or "models/model.json" not in relative:
                raise ValueError(
                    f"{where} is not an archive written by save_model"
                    + (f": unexpected entries {unexpected[:5]}" if unexpected else "")
                )
            compressed = [name for name, info in zip(relative, infos) if info.compress_type != zipfile.ZIP_STORED]
            if compressed:
                raise ValueError(
                    f"{where} is not an archive written by save_model: compressed entries {compressed[:5]}"
                )
            return {name: archive.read(info) for name, info in zip(relative, infos)}
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as exc:
        raise ValueError(f"{where} is not a readable zip archive: {exc}") from exc


def _checked_archive(path):
    """A copy of the archive at ``path``, in memory, once nothing in it needs unpickling or evaluating.

    torch then reads this copy, made of the very bytes that were checked, rather than the file:
    however a zip reader resolves names, it finds one entry for each.
    """
    where = repr(os.fspath(path))
    entries = _read_archive(path)
    try:
        program = json.loads(entries["models/model.json"])
        configs = {name: dict(json.loads(entries[name])["config"]) for name in _PAYLOAD_CONFIGS if name in entries}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where} holds a malformed program or configuration ({exc!r})") from exc
    _check_payloads(configs, where)
    _check_program(program, where)
    if "data/sample_inputs/model.pt" in entries:
        try:
            torch.load(io.BytesIO(entries["data/sample_inputs/model.pt"]), weights_only=True)
        except Exception as exc:
            raise ValueError(f"{where} holds sample inputs that are not plain tensors") from exc
    copy = io.BytesIO()
    with zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(f"{_ARCHIVE_ROOT}/{name}", data)
    copy.seek(0)
    return copy


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

    Nothing in the file is unpickled, evaluated or imported. The archive is refused with a
    ``ValueError`` unless it holds only the entries ``torch.export.save`` writes for a plain
    network (JSON and raw tensor data, each name once, uncompressed), its weights are not
    pickled, and every string of the program that torch would evaluate or resolve is of the
    kind ``save_model`` writes: symbolic shapes are integer arithmetic on shape symbols (parsed
    here, never evaluated), nodes call ATen operators only, inputs and outputs are tuples,
    lists and dicts. ``torch.export.load`` then reads an in-memory copy of the checked entries,
    not the file, and the program's Python guards are not compiled (input shapes are still
    checked).

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
    archive = _checked_archive(path)
    # Without check_guards, module() does not exec the program's guards_code (Python source
    # from the file); the input shapes are still checked against the saved ranges.
    module = torch.export.load(archive).module(check_guards=False)
    # ExportedProgram.module() forbids both train() and eval(); eval() is harmless (the graph
    # already computes in eval mode) and is what callers use before inference.
    del module.eval
    module.train = types.MethodType(_train_in_eval_only, module)
    return module.eval()
