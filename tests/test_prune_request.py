"""``PruneRequest``: the one checked value the command line, the Python API and ``prune`` share.

A request built in Python prunes through the library exactly as the same flags do through ``gisp prune``;
an invalid one fails in its constructor, before any model is loaded, with the very line the command prints.
"""

import json

import pytest

from gisp_plugin import PruneRequest, prune
from gisp_plugin.checkpoint.saving import load_pruned
from gisp_plugin.cli import main
from tests.cli.clear_error import assert_clear_error
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("prune-request")
    model_dir, text = tiny_folder(root, "llama", tokenizer)  # max_position_embeddings 128
    return model_dir, text


def test_a_request_built_in_python_prunes_like_the_command(folders, tmp_path, capsys):
    model_dir, text = folders
    request = PruneRequest(
        model=str(model_dir),
        method="wanda_sp",
        targets=[0.4, 0.25, 0.4],
        out=tmp_path / "api",
        calibration=f"file:{text}",
        n_samples=2,
        seqlen=16,
    )
    assert request.targets == (0.25, 0.4) and request.pad_to == 1 and request.export == ()
    assert (request.data.source, request.data.n_samples, request.data.seqlen) == (f"file:{text}", 2, 16)
    summary = prune(request)
    assert [line["target"] for line in summary] == [0.25, 0.4]
    for line in summary:
        load_pruned(line["folder"])  # a complete pruned folder, checked against its record
    capsys.readouterr()
    argv = ["prune", "--model", model_dir, "--method", "wanda_sp", "--sparsity", "0.4,0.25", "--out", tmp_path / "cli",
            "--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "16", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    api_run = json.loads((tmp_path / "api" / "run.json").read_text())
    cli_run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert api_run["request"] == cli_run["request"] == request.record()  # one request, whichever entry built it
    for api_line, cli_line in zip(summary, printed, strict=True):
        api_record = json.loads((tmp_path / "api" / api_line["folder"].rsplit("/", 1)[1] / "pruning.json").read_text())
        cli_record = json.loads((tmp_path / "cli" / cli_line["folder"].rsplit("/", 1)[1] / "pruning.json").read_text())
        assert api_record["pruned_structures"] == cli_record["pruned_structures"]


BAD = [  # (PruneRequest fields over a valid request, what the error names)
    ({"method": "gsip"}, "unknown method 'gsip'"),
    ({"targets": [1.5]}, "sparsity 1.5 is outside (0, 1)"),
    ({"options": {"nonsense": "1"}}, "nonsense"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"device": "gpu7"}, "unknown device 'gpu7'"),
    ({"attn": "fast"}, "unknown attention implementation 'fast'"),
    ({"trajectory_only": True}, "--trajectory-only needs a nested method"),
    ({"export": "nonsense"}, "nonsense"),
    ({"export": "gguf", "quantize": "int8wo"}, "drop --quantize"),
    ({"cpu_offload": True}, "give it together with --fsdp"),
    ({"fsdp": True}, "launch with torchrun"),
    ({"calibration": "file:/no/such.txt"}, "/no/such.txt"),
    ({"seqlen": 129}, "calibration seqlen=129 is longer than model"),
    ({"method": "magnitude", "calibration": None, "recover_steps": 1}, "--recover-steps"),
]
FLAGS = {"targets": "--sparsity", "quantize": "-q"}  # the others are --FIELD-NAME


def as_flags(fields: dict) -> list[str]:
    """The ``gisp prune`` command line that asks for the request ``fields``."""
    argv = ["prune"]
    for name, value in fields.items():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif name == "options":
            argv += [part for key, item in value.items() for part in ("-o", f"{key}={item}")]
        elif name == "targets":
            argv += [flag, ",".join(str(t) for t in value)]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize(("fields", "named"), BAD, ids=[" ".join(as_flags(fields)[1:]) for fields, _ in BAD])
def test_an_invalid_request_fails_in_its_constructor_with_the_commands_line(folders, tmp_path, capsys, fields, named):
    model_dir, text = folders
    out = tmp_path / "out"
    valid = {"model": str(model_dir), "method": "wanda_sp", "targets": [0.25], "out": out, "device": "cpu"}
    request = {**valid, "calibration": f"file:{text}", "n_samples": 2, "seqlen": 16, **fields}
    with pytest.raises((ValueError, LookupError, OSError)) as raised:  # the kinds the command reports as bad input
        PruneRequest(**request)
    assert named in str(raised.value)
    capsys.readouterr()
    code = main(as_flags(request))
    line = assert_clear_error(code, capsys.readouterr().err, "prune", [named])
    assert line == f"gisp prune: error: {raised.value}"  # the same one line, from Python and from the command
    assert not out.exists()


def test_a_python_caller_is_told_what_the_command_line_parsers_rule_out(folders, tmp_path):
    model_dir, text = folders
    given = {"model": str(model_dir), "method": "magnitude", "targets": [0.2], "out": tmp_path / "out"}
    for fields, message in [
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"n_samples": 0}, "n_samples must be >= 1, got 0"),
        ({"pad_to": 2.5}, "pad_to must be a whole number, got 2.5"),
        ({"method": None}, "method must be a string, got None"),
        ({"fsdp": "yes"}, "fsdp must be true or false, got 'yes'"),
        ({"options": ["steps=4"]}, "options must map option names to values"),
        ({"targets": "0.2"}, "give at least one sparsity target"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            PruneRequest(**{**given, **fields})
    assert not (tmp_path / "out").exists()


def test_a_request_is_frozen(folders, tmp_path):
    model_dir, _ = folders
    request = PruneRequest(model=str(model_dir), method="magnitude", targets=[0.2], out=tmp_path / "out")
    with pytest.raises(AttributeError):
        request.targets = (0.5,)
