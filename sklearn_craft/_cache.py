"""The on-disk cache behind ``memory=``: arrays only, so that nothing read back is ever unpickled.

:class:`~sklearn_craft.pooling.ActivationPooler` and
:class:`~sklearn_craft.selection.LassoFilterSelector` cache results that do not depend on the
parameters a grid search varies. ``joblib.Memory`` would store them as pickles, and anyone able
to write the cache folder could then run code in every process that reads it. Here an entry is
one ``.npz`` file of numeric arrays, read with ``allow_pickle=False``: an entry that cannot be
read that way (truncated, corrupt, a pickle, an object array) is ignored and recomputed, and
nothing in it runs. Entries are written to a temporary file and renamed into place, so
concurrent writers (joblib workers, dask) never expose a half-written entry.

The folder is ``<location>/sklearn_craft/<function>/``, where ``location`` is ``memory`` itself
(a path) or the location of a ``joblib.Memory``; an entry's name is the SHA-1 digest of the
function's code and of everything its result depends on.
"""

import marshal
import os
import tempfile
import warnings
import zipfile

import joblib
import numpy as np

__all__ = ["cache_folder", "cached_arrays", "digest"]


def digest(value):
    """SHA-1 digest of ``value``, hashed as joblib hashes function arguments.

    SHA-1 runs about 1.7x faster than joblib's default MD5 on CPUs with SHA extensions (1.16 vs
    0.69 GB/s here); hashing weights and images is most of what a cached call costs. joblib
    hashes by pickling, which runs nothing: it is unpickling that must never happen.
    """
    return joblib.hash(value, hash_name="sha1")


def cache_folder(memory, function):
    """Folder of ``function``'s entries under ``memory`` (None, a path or a joblib.Memory); None: no cache."""
    location = memory if isinstance(memory, (str, os.PathLike)) else getattr(memory, "location", None)
    if location is None:
        return None
    return os.path.join(os.fspath(location), "sklearn_craft", f"{function.__module__}.{function.__qualname__}")


def _load(path):
    """The arrays of the entry at ``path``, or None when it is absent or not a plain ``.npz`` of arrays."""
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if not isinstance(stored, np.lib.npyio.NpzFile):
        return None
    try:
        with stored:
            return {name: stored[name] for name in stored.files}
    # Object arrays raise ValueError without allow_pickle; a damaged member raises the others.
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def _store(path, arrays):
    """Write ``arrays`` to ``path`` through a temporary file renamed into place; warn if that fails."""
    temporary = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"memory: could not write the cache entry {path!r} ({error})", UserWarning, stacklevel=3)
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)


def cached_arrays(memory, function, key, compute, valid=None):
    """The dict of arrays ``compute()`` returns, read from the cache of ``memory`` when it holds it.

    Parameters
    ----------
    memory : None, str, path-like or joblib.Memory
        Where the cache lives (see the module docstring); None computes without caching.
    function : function
        The function whose result is cached: its qualified name names the folder, its code is
        part of the key, so an entry written by another version of it is not read.
    key : object
        Everything the result depends on besides the code, hashed with :func:`digest`.
    compute : callable
        Returns the result as a dict of name -> numeric ndarray.
    valid : callable, default=None
        Predicate on a stored dict of arrays; an entry it rejects is recomputed.

    Returns
    -------
    arrays : dict of str to ndarray
        The stored arrays, or what ``compute()`` returned (then stored).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from sklearn_craft._cache import cached_arrays
    >>> calls = []
    >>> def squares(n):
    ...     calls.append(n)
    ...     return {"values": np.arange(n) ** 2}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     first = cached_arrays(folder, squares, 4, lambda: squares(4))
    ...     again = cached_arrays(folder, squares, 4, lambda: squares(4))
    >>> again["values"].tolist(), calls
    ([0, 1, 4, 9], [4])
    """
    folder = cache_folder(memory, function)
    if folder is None:
        return compute()
    path = os.path.join(folder, digest((marshal.dumps(function.__code__), key)) + ".npz")
    arrays = _load(path)
    if arrays is not None and (valid is None or valid(arrays)):
        return arrays
    arrays = compute()
    _store(path, arrays)
    return arrays
