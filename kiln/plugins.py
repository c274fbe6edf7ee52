"""Plugins: user-registered operators for what kiln lacks (a custom domain op, or an override).

    @kiln.plugin("Mish", domain="com.example", version="1.0",
                 infer=lambda inputs, attrs: [(inputs[0].dtype, inputs[0].shape)])
    def mish(x):
        return x * torch.tanh(torch.nn.functional.softplus(x))

An engine that uses a plugin records its name and version; loading the engine where the plugin is
not registered raises KILN-E506. The engine file never holds the plugin's code.
"""
from __future__ import annotations

from .errors import EngineFileError
from .ops.registry import PluginInfo, register, versions


def plugin(op: str, *, domain: str = "", version: str = "1", since: int = 1, infer=None, dtypes=None, check=None):
    """Register a kernel for `domain::op` as a plugin named after them, at `version`."""
    name = f"{domain}::{op}" if domain else op
    return register(op, since=since, domain=domain, infer=infer, dtypes=dtypes, check=check,
                    plugin=PluginInfo(name, str(version)))


def plugins_used(graph) -> list[dict[str, str]]:
    from .ops import registry

    found = {}
    for owner, node in graph.walk():
        definition = registry.lookup(node.op, node.domain, owner.opsets.get(node.domain, graph.opsets.get(node.domain, 1)))
        if definition is not None and definition.plugin is not None:
            found[definition.plugin.name] = {"name": definition.plugin.name, "version": definition.plugin.version,
                                             "op": node.op, "domain": node.domain}
    return sorted(found.values(), key=lambda p: p["name"])


def check_plugins(required: list[dict[str, str]], source: str = "engine") -> None:
    for entry in required:
        registered = [d.plugin for d in versions(entry["op"], entry["domain"]) if d.plugin is not None]
        if not registered:
            raise EngineFileError(
                f"{source} needs the plugin {entry['name']} (version {entry['version']}), which is not registered in this process",
                code="KILN-E506", where=entry["name"],
                hint=f"import the module that registers it (@kiln.plugin(\"{entry['op']}\", domain=\"{entry['domain']}\", "
                     f"version=\"{entry['version']}\")) before kiln.load; engine files never carry plugin code")
        if all(p.version != entry["version"] for p in registered):
            have = ", ".join(p.version for p in registered)
            raise EngineFileError(f"{source} was built with plugin {entry['name']} version {entry['version']}; "
                                  f"this process registers version {have}", code="KILN-E506", where=entry["name"],
                                  hint="register the same plugin version, or rebuild the engine with this one")
