"""Plugin discovery and name lookup."""

import pytest

from gisp_plugin.plugins import hookimpl
from gisp_plugin.plugins.manager import UnknownNameError, get_plugin_manager, lookup, registered


def test_builtin_methods_are_found_through_the_manager():
    methods = registered("method")
    assert {"magnitude", "random"} <= set(methods)
    assert methods["magnitude"].plugin == "gisp_plugin.methods.magnitude"
    assert methods["magnitude"].version.count(".") >= 1


def test_unknown_name_lists_available():
    with pytest.raises(UnknownNameError, match=r"unknown method 'gsip'; available: .*magnitude.*random"):
        lookup("method", "gsip")


def test_duplicate_names_are_rejected():
    magnitude = lookup("method", "magnitude")

    class Clash:
        @hookimpl
        def gisp_methods(self):
            return [magnitude]

    pm = get_plugin_manager()
    plugin = Clash()
    pm.register(plugin, name="clash")
    try:
        with pytest.raises(ValueError, match="provided by both"):
            registered("method")
    finally:
        pm.unregister(plugin)
    assert "magnitude" in registered("method")


def test_core_never_imports_baselines():
    import pathlib

    core = pathlib.Path(__import__("gisp_plugin").__file__).parent
    offenders = [str(p) for p in core.rglob("*.py") if "gisp_baselines" in p.read_text()]
    assert offenders == []
