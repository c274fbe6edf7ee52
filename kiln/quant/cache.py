"""The calibration cache (--calibCache): per-tensor thresholds in a small JSON file, so a rebuild needs no data."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PrecisionError

FORMAT = "kiln-calibration-cache"
VERSION = 1


def write(path: str, calibrator: str, tensors: dict[str, dict]) -> None:
    record = {"format": FORMAT, "version": VERSION, "calibrator": calibrator, "tensors": tensors}
    Path(path).write_text(json.dumps(record, indent=1, sort_keys=True))


def read(path: str) -> tuple[str, dict[str, dict]]:
    """(calibrator, {tensor: {"amax", "low", "high"}}) from a cache file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PrecisionError(f"calibration cache {path!r} cannot be read: {error}", code="KILN-E302",
                             hint="delete it and build again with --calib DATA to write a fresh one") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise PrecisionError(f"{path!r} is not a kiln calibration cache (version {VERSION})", code="KILN-E302",
                             hint="delete it and build again with --calib DATA to write a fresh one")
    return record["calibrator"], record["tensors"]


def check_covers(path: str, tensors: dict, wanted: list[str]) -> None:
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise PrecisionError(f"calibration cache {path!r} has no threshold for {len(missing)} tensor(s) this model "
                             f"quantizes (first: {missing[0]!r}): it was written for another model or kiln version",
                             code="KILN-E302", hint="build once with --calib DATA to rewrite the cache")
