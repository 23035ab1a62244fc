"""``gisp eval`` on a dense and on a pruned folder (CLI module: gisp_plugin/cli/eval_cmd.py)."""

from __future__ import annotations

import json
import re

import pytest

from gisp_plugin.cli import main
from gisp_plugin.evaluation.perplexity import perplexity_of_text
from tests.evaluation.conftest import EVAL_TEXT
from tests.tiny import tiny_model


@pytest.fixture
def dense_folder(tmp_path, tokenizer):
    folder = tmp_path / "dense"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_dense_folder_prints_table_and_json(dense_folder, tokenizer, test_source, tmp_path, capsys):
    out = tmp_path / "eval.json"
    spec = f"perplexity:source={test_source},seqlen=16"
    assert main(["eval", "--model", str(dense_folder), "--eval", spec, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ppl[{test_source}@16]" in printed and "context length 16 tokens" in printed
    payload = json.loads(out.read_text())
    value = payload["results"][spec]["metrics"][f"ppl[{test_source}@16]"]
    assert value == pytest.approx(perplexity_of_text(tiny_model("llama"), tokenizer, EVAL_TEXT, seqlen=16).ppl, rel=1e-6)
    assert payload["params"]["total"] > 0


def test_eval_pruned_folder(dense_folder, test_source, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense_folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(pruned)]) == 0
    folder = next(pruned.glob("magnitude-s0.30"))
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--eval", f"perplexity:source={test_source},seqlen=16,max_windows=4"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"magnitude at structural sparsity 0\.(2[5-9]|3[0-5])\d", printed), printed
    assert "4 windows" in printed


def test_bad_spec_fails_before_loading_the_model(capsys):
    assert main(["eval", "--model", "/no/such/folder", "--eval", "perplexity:seqlen=oops"]) == 2
    assert "seqlen='oops' is not a valid int" in capsys.readouterr().err
