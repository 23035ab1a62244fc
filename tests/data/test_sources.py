"""The built-in data-source plugin: every source registered, with its kind."""

from __future__ import annotations

from gisp_plugin.plugins.manager import registered

EXPECTED = {
    "c4": "text",
    "wikitext2": "text",
    "ptb": "text",
    "lambada-novels": "text",
    "boolq-wiki": "text",
    "cmqa": "multiple_choice",
    "cmqa-offline": "multiple_choice",
    "gsm8k": "qa",
    "gsm8k-offline": "qa",
}


def test_every_builtin_source_is_registered_with_its_kind():
    sources = registered("data source")
    assert {name: sources[name].item.kind for name in EXPECTED} == EXPECTED
    for name in EXPECTED:
        item = sources[name].item
        assert sources[name].plugin == "gisp_plugin.data.sources"
        assert item.description
        assert (item.text is not None) == (item.kind == "text")
