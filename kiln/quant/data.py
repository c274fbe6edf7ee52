"""Calibration and validation data: a directory of .npz/.npy feeds, one .npz/.npy file, or any iterable of feed dicts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import PrecisionError

HINT = ("give a directory of .npz files (one feed each, keyed by input name) or, for a one-input model, .npy "
        "files; in Python, any iterable of {input name: array} dicts. 100-500 real inputs are typical")


def feeds(source: Any, input_names: list[str], what: str = "calibration") -> Iterator[dict[str, np.ndarray]]:
    """Yield one feed dict at a time, so a large data set never sits in memory at once."""
    if source is None:
        raise PrecisionError(f"no {what} data was given", code="KILN-E302", hint=HINT)
    if isinstance(source, (str, Path)):
        yield from _from_path(Path(source), input_names, what)
        return
    if isinstance(source, dict):  # one feed given bare
        source = [source]
    if not isinstance(source, Iterable):
        raise PrecisionError(f"{what} data of type {type(source).__name__} is not a path or an iterable of feed dicts",
                             code="KILN-E302", hint=HINT)
    for index, feed in enumerate(source):
        if not isinstance(feed, dict):
            raise PrecisionError(f"{what} item {index} is a {type(feed).__name__}, not a dict of input arrays",
                                 code="KILN-E302", hint=HINT)
        yield feed


def _from_path(path: Path, input_names: list[str], what: str) -> Iterator[dict[str, np.ndarray]]:
    if not path.exists():
        raise PrecisionError(f"{what} data {str(path)!r} does not exist", code="KILN-E302", hint=HINT)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    if not files:
        raise PrecisionError(f"{what} directory {str(path)!r} holds no .npz or .npy files", code="KILN-E302", hint=HINT)
    for file in files:
        try:
            if file.suffix == ".npz":
                with np.load(file, allow_pickle=False) as archive:
                    yield {name: archive[name] for name in archive.files}
                continue
            array = np.load(file, allow_pickle=False)
        except Exception as error:  # noqa: BLE001 (numpy raises several types for damaged files)
            raise PrecisionError(f"cannot read {what} file {str(file)!r}: {type(error).__name__}: {error}",
                                 code="KILN-E302", hint=HINT) from None
        if len(input_names) != 1:
            raise PrecisionError(f"{file.name} is a bare .npy array, but the model has {len(input_names)} inputs "
                                 f"({', '.join(input_names)})", code="KILN-E302",
                                 hint="save each feed as .npz with one array per input name (np.savez(path, **feed))")
        yield {input_names[0]: array}
