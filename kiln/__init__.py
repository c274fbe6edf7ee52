"""kiln: an open inference optimizer. Parse a network, optimize it, build an engine, run it."""
from __future__ import annotations

__version__ = "0.1.0"

from .builder import BuilderConfig, build
from .engine.bindings import Binding
from .engine.profiles import Profile
from .engine.runtime import Engine, load
from .errors import BindingError, BuildError, EngineFileError, KilnError, ParseError, PrecisionError, ResourceError
from .frontend.torch import from_torch
from .plugins import plugin

__all__ = ["Binding", "BindingError", "BuildError", "BuilderConfig", "Engine", "EngineFileError", "KilnError",
           "ParseError", "PrecisionError", "Profile", "ResourceError", "build", "from_torch", "load", "plugin", "__version__"]
