"""The fuzz corpus and every crash reproducer replay as ordinary tests.

``fuzz/fuzz_connection.py`` (an atheris target) runs scripts of man-in-the-middle
corruptions against the sans-IO core; its corpus (``fuzz/corpus/``) and the
inputs that found bugs (``fuzz/crashes/``, named after what they found) go
through the same ``run_one`` here, without atheris, so a finding stays fixed.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import anyio_asyncssl as A

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
INPUTS = sorted([*(FUZZ / "corpus").iterdir(), *(FUZZ / "crashes").glob("*")])


def _load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_connection", FUZZ / "fuzz_connection.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def target() -> Iterator[ModuleType]:
    module = _load_target()
    yield module
    module.close_harness()


def test_the_target_imports_without_atheris(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "atheris", None)   # importing it raises ImportError
    assert hasattr(_load_target(), "run_one")
    assert INPUTS, "the corpus is empty"
    assert sum(p.stat().st_size for p in INPUTS) < 1_000_000


@pytest.mark.parametrize("path", INPUTS, ids=[f"{p.parent.name}/{p.name}" for p in INPUTS])
def test_input_replays_cleanly(target: ModuleType, path: Path) -> None:
    target.run_one(path.read_bytes())


def test_the_replay_catches_an_undocumented_exception(
        target: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle fails an input whose call raises anything but a TLSError."""
    script = (FUZZ / "corpus" / "seed-life-tls13_plain-server").read_bytes()

    def broken_read(self: A.TLSConnection, *args: object, **kw: object) -> object:
        raise KeyError("not a documented outcome")

    monkeypatch.setattr(A.TLSConnection, "read", broken_read)
    with pytest.raises(target.Finding, match="undocumented KeyError"):
        target.run_one(script)


def test_the_replay_catches_a_paused_job_left_behind(
        target: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle fails an input after which a job stays paused (a leak)."""
    script = (FUZZ / "corpus" / "seed-paused-dropped-server").read_bytes()
    parked_before = A.connection_counters()["parked_now"]
    monkeypatch.setattr(A, "reap_parked", lambda: 0)   # dropped jobs are never finished
    monkeypatch.setattr(target, "JOB_DEADLINE", 0.2)
    with pytest.raises(target.Finding, match="parked_now"):
        target.run_one(script)
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while A.connection_counters()["parked_now"] > parked_before and time.monotonic() < deadline:
        A.reap_parked()
        time.sleep(0.001)
    assert A.connection_counters()["parked_now"] == parked_before
