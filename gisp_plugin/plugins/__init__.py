"""The plugin interface: hook markers for plugin authors, and the manager that finds plugins.

A plugin is a module with functions decorated ``@hookimpl`` whose names match the hooks in
``gisp_plugin.plugins.hookspecs``; expose it under the entry-point group ``gisp_plugin``.
"""

from gisp_plugin.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
