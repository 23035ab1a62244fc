"""The plugin manager: built-in plugins first, then every ``gisp_plugin`` entry point.

Built-in plugins are imported by module name, exactly like third-party ones are found by entry
point, so the core never depends on a particular method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

import gisp_plugin
from gisp_plugin.plugins import hookspecs

DEFAULT_PLUGINS = (
    "gisp_plugin.adapters.decoders",
    "gisp_plugin.methods.magnitude",
    "gisp_plugin.methods.random_pruning",
    "gisp_plugin.methods.gisp",
    "gisp_plugin.importance.losses",
    "gisp_plugin.evaluation.evaluators",
    "gisp_plugin.data.sources",
    "gisp_plugin.export.formats",
)

HOOKS = {
    "method": "gisp_methods",
    "adapter": "gisp_adapters",
    "data source": "gisp_data_sources",
    "loss": "gisp_losses",
    "evaluator": "gisp_evaluators",
    "export format": "gisp_export_formats",
}


class UnknownNameError(LookupError):
    """A method, adapter, data source, loss or evaluator name that no plugin provides."""


@dataclass(frozen=True)
class Registered:
    """One item a plugin contributed, with where it came from."""

    item: Any
    plugin: str
    version: str


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-in and installed plugins registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm


def _plugin_versions(pm: pluggy.PluginManager) -> dict[str, str]:
    versions = {name: gisp_plugin.__version__ for name in DEFAULT_PLUGINS}
    for plugin, dist in pm.list_plugin_distinfo():
        versions[pm.get_name(plugin)] = dist.version
    return versions


def registered(what: str) -> dict[str, Registered]:
    """Every item of one kind (``"method"``, ``"adapter"``, ...) by name, with its plugin and version."""
    pm = get_plugin_manager()
    versions = _plugin_versions(pm)
    items: dict[str, Registered] = {}
    for impl in getattr(pm.hook, HOOKS[what]).get_hookimpls():
        for item in impl.function() or []:
            if item.name in items:
                raise ValueError(
                    f"{what} name {item.name!r} is provided by both {items[item.name].plugin!r} and {impl.plugin_name!r}"
                )
            items[item.name] = Registered(item, impl.plugin_name, versions.get(impl.plugin_name, "unknown"))
    return dict(sorted(items.items()))


def lookup(what: str, name: str) -> Any:
    """The item of kind ``what`` called ``name``, or an error that lists the available names."""
    items = registered(what)
    if name not in items:
        available = ", ".join(items) or "none"
        raise UnknownNameError(f"unknown {what} {name!r}; available: {available}")
    return items[name].item
