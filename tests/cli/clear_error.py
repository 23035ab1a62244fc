"""The shape of a clear error, as the README promises it: exit status 2 and one line that names the bad value.

An unforeseen exception (a bug) exits 1 with ``"gisp CMD: error: SomeError: ..."`` and a hint to rerun with
``-v``; a test of bad inputs must fail on it, not count it as a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable


def _progress(line: str) -> bool:
    """A tqdm progress bar (loading weights, say) is progress shown on stderr, not part of the error."""
    return "%|" in line and line.rstrip().endswith("]")


def assert_clear_error(code: int, err: str, command: str, names: Iterable[str]) -> str:
    """Assert exit 2 and exactly one stderr line from ``gisp COMMAND`` naming one of ``names``; return the line."""
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # what a terminal shows after tqdm's \r
    lines = [line for line in shown if line.strip() and not _progress(line)]
    assert code == 2, f"exit {code}, not the clear-error 2: {err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one: {err}"
    line = lines[0]
    assert line.startswith(f"gisp {command}: error: "), line
    assert "Traceback" not in line and "run with -v for the traceback" not in line, line
    names = [str(name) for name in names]
    assert any(name in line for name in names), f"the error names none of {names}: {line}"
    return line
