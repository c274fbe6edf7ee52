"""The timing cache: measured tactic times kept in a file, so a second build of the same model on the
same GPU chooses its tactics without timing them again (TensorRT's --timingCacheFile).

A record's key names everything that could change a measurement: the GPU's name and compute
capability, the kiln/torch/triton versions, and the step (operator, attributes, input shapes and
dtypes, precisions allowed). The file is JSON; a file written for another GPU or other versions
simply has no matching keys, so it is never wrong, only unhelpful.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..errors import BuildError

FORMAT = 1


def environment() -> dict[str, str]:
    """What a timing depends on besides the step itself: GPU model, capability, software versions."""
    import torch

    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    capability = "%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "capability": capability, "kiln": __version__, "torch": torch.__version__, "triton": triton_version}


class TimingCache:
    """{key: {"times": {tactic: ms}, "chosen": tactic}}, loaded from and saved to `path` (None: in memory)."""

    def __init__(self, path: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self.path = str(path) if path else None
        self.env = env if env is not None else environment()
        self.records: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if self.path and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            raise BuildError(f"timing cache {self.path} cannot be read: {error}", code="KILN-E203",
                             hint="delete the file (kiln writes a new one) or point --timingCacheFile elsewhere") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), dict):
            raise BuildError(f"{self.path} is not a kiln timing cache (format {FORMAT})", code="KILN-E203",
                             hint="delete the file (kiln writes a new one) or point --timingCacheFile elsewhere")
        self.records = data["records"]

    def key(self, signature: dict[str, Any]) -> str:
        text = json.dumps({"env": self.env, "step": signature}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, signature: dict[str, Any]) -> dict[str, Any] | None:
        record = self.records.get(self.key(signature))
        if record is None:
            self.misses += 1
        else:
            self.hits += 1
        return record

    def put(self, signature: dict[str, Any], times: dict[str, float], chosen: str, **details: Any) -> None:
        """Record a choice; `details` (JSON values) are what a later build needs to redo it without timing."""
        self.records[self.key(signature)] = {"times": times, "chosen": chosen, "op": signature.get("op", ""), **details}

    def save(self) -> None:
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "env": self.env, "records": self.records}, f, indent=1, sort_keys=True)
        os.replace(temporary, self.path)  # a build killed mid-write leaves the old cache whole
