"""Operators: one module per family, each operator registered once by decorator (see registry.py)."""
from .registry import OpDef, PluginInfo, all_ops, lookup, register, versions, why_unsupported

__all__ = ["OpDef", "PluginInfo", "all_ops", "lookup", "register", "versions", "why_unsupported"]
