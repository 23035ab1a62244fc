"""Placeholder registering no method yet; its helper branch replaces it with the method."""

from gisp_plugin.methods.api import MethodSpec
from gisp_plugin.plugins import hookimpl


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return []
