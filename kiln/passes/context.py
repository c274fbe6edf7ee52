"""What every pass receives: the build configuration and the counters its rewrites increment."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassContext:
    config: Any = None  # BuilderConfig; None in unit tests of a single pass
    counters: Counter = field(default_factory=Counter)
    validate: bool = False  # re-verify the IR after every pass (KILN_VALIDATE=1)
