"""The example plugin package, pip-installed in the test environment: found, selectable by name, runs end to end.

CI installs it with ``pip install --no-deps ./tests/example_plugin``.
"""

from importlib import metadata

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.plugins.manager import registered
from gisp_plugin.pruning import compact_subnetwork, run_method
from tests.tiny import random_ids, tiny_model

INSTALL = "pip install --no-deps ./tests/example_plugin"


@pytest.fixture(scope="module")
def example_version() -> str:
    try:
        return metadata.version("gisp-example-plugin")
    except metadata.PackageNotFoundError:
        pytest.fail(f"the example plugin is not installed in this environment; run: {INSTALL}")


def test_discovered_with_its_plugin_name_and_version(example_version):
    entry = registered("method")["lowest-index"]
    assert entry.plugin == "lowest_index"  # the entry point's name in the example's pyproject.toml
    assert entry.version == example_version == "0.0.1"
    assert entry.item.option_names() == ["skip_first"]


def test_selected_by_name_prunes_compacts_and_matches(tokenizer):
    model = tiny_model("mistral", intermediate_size=64)
    anatomy = adapter_for(model).anatomy(model)
    subs = list(run_method(model, tokenizer, "lowest-index", [0.25, 0.5], {"skip_first": "1"}))
    assert [s.target for s in subs] == [0.25, 0.5]
    ids = random_ids(2, 10)
    for sub in subs:
        assert bool(sub.keep[0, "attn_head"].all()) and bool(sub.keep[0, "mlp_channel"].all())  # skip_first=1
        pruned_channels = (~sub.keep[1, "mlp_channel"]).nonzero().flatten()
        assert torch.equal(pruned_channels, torch.arange(len(pruned_channels)))  # the lowest indices
        assert abs(sub.sparsity - sub.target) < 0.05
        compact, params = compact_subnetwork(model, sub)
        assert count_params(compact)["decoder"] == anatomy.params_kept(sub.keep)
        with MaskedModel(model, anatomy) as masked, torch.no_grad():
            masked.apply(sub.keep)
            expected = model(ids).logits
            torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
