"""Fuzzing the command line and the comparison file with hypothesis.

Every generated input holds at least one bad value that must be caught before a model is loaded.
Whatever it is: exit status 2 (a clear error, not the exit 1 of an unforeseen exception), exactly one line on
stderr that names a bad flag, field or value, and the output folder is either absent (never created) or
untouched (a folder holding an earlier run).
"""

import itertools
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gisp_plugin.cli import main
from gisp_plugin.harness.config import ComparisonConfig
from gisp_plugin.models.loading import DTYPES
from gisp_plugin.plugins.manager import registered
from tests.cli.clear_error import assert_clear_error
from tests.tiny import tiny_folder

METHODS = set(registered("method"))
WANDA = ("sequential", "batch_size")  # the options of the method the fuzzed commands run
COUNTER = itertools.count()
EXAMPLES = int(os.environ.get("GISP_FUZZ_EXAMPLES", "60"))  # a longer hunt: GISP_FUZZ_EXAMPLES=1000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir, text = tiny_folder(root, "llama", tokenizer)
    earlier = root / "earlier"  # a folder holding another run: must stay as it is
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out", str(earlier)]) == 0
    return root, model_dir, text, earlier


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _is_device(text: str) -> bool:
    try:
        return torch.device(text).type in ("cpu", "cuda", "mps")
    except (RuntimeError, TypeError):
        return False


def _is_count(text: str, minimum: int) -> bool:
    try:
        return int(text) >= minimum
    except ValueError:
        return False


def _fractions(text: str) -> bool:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        return False
    return bool(values) and all(0 < v < 1 for v in values)


printable = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
BAD_PRUNE = st.one_of(
    st.tuples(st.just("--method"), printable.filter(lambda t: t.strip() not in METHODS)),
    st.tuples(st.just("--sparsity"), printable.filter(lambda t: not _fractions(t) and not t.startswith("-"))),
    st.tuples(st.just("--sparsity"), st.floats(allow_nan=True).filter(lambda v: not 0 < v < 1).map(repr)),
    st.tuples(st.just("--n-samples"), st.integers(-5, 0).map(str) | printable.filter(lambda t: not _is_count(t, 1))),
    st.tuples(st.just("--seqlen"), st.integers(-5, 1).map(str) | st.integers(129, 10**6).map(str)),
    st.tuples(st.just("--pad-to"), st.integers(-5, 0).map(str)),
    st.tuples(st.just("--seed"), printable.filter(lambda t: not _is_count(t, 0))),
    st.tuples(st.just("--recover-steps"), st.integers(-9, -1).map(str)),
    st.tuples(st.just("--device"), printable.filter(lambda t: not _is_device(t))),
    st.tuples(st.just("--dtype"), printable.filter(lambda t: t not in DTYPES)),
    st.tuples(
        st.just("-o"), st.from_regex(r"[a-z_]{1,8}=[a-z0-9]{0,4}", fullmatch=True).filter(lambda t: t.split("=")[0] not in WANDA)
    ),
    st.tuples(st.just("-o"), printable.filter(lambda t: "=" not in t or not t.partition("=")[0].strip())),
    st.tuples(st.just("--model"), st.from_regex(r"/no/such/[a-z]{1,6}", fullmatch=True)),
    st.tuples(st.just("--calibration"), st.from_regex(r"(file:/no/such/[a-z]{1,5}|[a-z]{3,9}-nonsense)", fullmatch=True)),
)


def _names(bad: list[tuple[str, str]]) -> list[str]:
    """What a clear error about ``bad`` may name: a flag, an option's name, or a value given."""
    names = []
    for flag, value in bad:
        names += [flag] if flag != "-o" else [flag, value.partition("=")[0].strip()]
        names += [form for text in (value, value.strip()) for form in (text, repr(text))]
        names.append(value.partition(":")[2])  # file:PATH may be named by its PATH
    return [name for name in names if name]


@FUZZ
@given(bad=st.lists(BAD_PRUNE, min_size=1, max_size=3), into_earlier=st.booleans())
def test_fuzzed_prune_arguments_fail_cleanly(setup, capsys, bad, into_earlier):
    root, model_dir, text, earlier = setup
    out = earlier if into_earlier else root / f"out{next(COUNTER)}"
    before = _snapshot(earlier)
    values = {"--model": str(model_dir), "--method": "wanda_sp", "--sparsity": "0.2", "--calibration": f"file:{text}"}
    values.update({"--n-samples": "2", "--seqlen": "16"})
    options = []
    for flag, value in bad:
        if flag == "-o":
            options += ["-o", value]
        else:
            values[flag] = value
    argv = ["prune", "--out", str(out), *[part for pair in values.items() for part in pair], *options]
    code = main(argv)
    err = capsys.readouterr().err
    held = [str(out)] if into_earlier else []  # into the earlier run's folder, that clash is a bad value too
    assert_clear_error(code, err, "prune", _names(bad) + held)
    assert _snapshot(earlier) == before
    if not into_earlier:
        assert not out.exists()


def _not_a_count(minimum: int):
    return st.one_of(
        st.text(max_size=6),
        st.floats(),
        st.lists(st.integers(), max_size=2),
        st.none(),
        st.booleans(),
        st.integers(-9, minimum - 1),
    )


FIELDS = {f for f in ComparisonConfig.__dataclass_fields__}
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=2), max_leaves=4
)
BAD_CONFIG = st.one_of(
    st.tuples(st.just("n_samples"), _not_a_count(1)),
    st.tuples(st.just("seqlen"), _not_a_count(2) | st.integers(129, 10**7)),
    st.tuples(st.just("seed"), _not_a_count(0)),
    st.tuples(st.just("pad_to"), _not_a_count(1).filter(lambda v: v is not None)),  # null is the default: automatic
    st.tuples(st.just("sparsities"), st.lists(st.floats().filter(lambda v: not 0 < v < 1), min_size=1, max_size=3)),
    st.tuples(st.just("sparsities"), st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans())),
    st.tuples(
        st.just("methods"), st.one_of(st.integers(), st.lists(st.text(max_size=6).filter(lambda t: t not in METHODS), min_size=1))
    ),
    st.tuples(st.just("method_options"), st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("method_options"), st.fixed_dictionaries({"gisp": JSONISH.filter(lambda v: not isinstance(v, dict))})),
    st.tuples(st.just("method_options"), st.fixed_dictionaries({"gisp": st.fixed_dictionaries({"steps": st.integers(-5, 0)})})),
    st.tuples(
        st.just("evals"),
        st.one_of(st.integers(), st.just([]), st.lists(st.from_regex(r"[a-z]{2,8}x", fullmatch=True), min_size=1)),
    ),
    st.tuples(st.just("device"), st.text(max_size=8).filter(lambda t: not _is_device(t))),
    st.tuples(st.just("dtype"), st.text(max_size=8).filter(lambda t: t not in DTYPES)),
    st.tuples(st.just("save_models"), st.one_of(st.text(max_size=4), st.integers(), st.none())),
    st.tuples(st.just("model"), st.from_regex(r"/no/such/[a-z]{1,6}", fullmatch=True) | st.integers()),
    st.tuples(st.text(min_size=1, max_size=8).filter(lambda k: k not in FIELDS), JSONISH),
)


def _config_names(key: str, value) -> list[str]:
    """What a clear error about field ``key`` set to ``value`` may name: the field, a nested key, a value."""
    names = [key, repr(key)]
    if isinstance(value, dict):
        for inner, item in value.items():
            names += _config_names(inner, item)
    elif isinstance(value, list):
        names += [repr(value)] + [name for item in value for name in _config_names(key, item)]
    elif value not in ("", None):
        names += [form for text in (str(value), str(value).strip()) for form in (text, repr(text))]
    return [name for name in names if name]


@FUZZ
@given(bad=st.lists(BAD_CONFIG, min_size=1, max_size=3), suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzzed_comparison_files_fail_cleanly(setup, capsys, bad, suffix):
    root, model_dir, text, _ = setup
    values = {
        "model": str(model_dir),
        "methods": ["wanda_sp"],
        "sparsities": [0.2],
        "evals": [f"perplexity:source=file:{text},seqlen=16,max_windows=2"],
        "calibration": f"file:{text}",
        "n_samples": 2,
        "seqlen": 16,
    }
    values.update(dict(bad))
    n = next(COUNTER)
    config = root / f"config{n}{suffix}"
    config.write_text(json.dumps(values, ensure_ascii=False))  # JSON is valid YAML (\u escapes of pairs are not)
    out = root / f"compare{n}"
    code = main(["compare", "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert_clear_error(code, err, "compare", [str(config), *[name for key, value in bad for name in _config_names(key, value)]])
    assert not out.exists()
