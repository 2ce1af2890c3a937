"""The C boundary has one source: asyncssl.h's cffi blocks.

build.py reads the blocks into cffi's cdef (``header_cdef``) and stubgen.py
types the same cdef for mypy (``_openssl.pyi``).  These tests keep the
pieces from drifting apart: the committed stub is what the generator makes
now, every ``lib.<name>`` the Python code uses is declared, the compiled
module offers exactly the declared names, and the header reader refuses what
cffi could not read.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from anyio_asyncssl._native._openssl import ffi as compiled_ffi
from anyio_asyncssl._native._openssl import lib as compiled_lib

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "src" / "anyio_asyncssl" / "_native"


def _tool(name: str) -> ModuleType:
    """build.py / stubgen.py from the source tree (build tools: the wheel has neither)."""
    spec = importlib.util.spec_from_file_location(f"_asx_test_{name}", NATIVE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:  # the same files, typed: mypy reads them in the package
    from anyio_asyncssl._native import build, stubgen
else:
    build = _tool("build")
    stubgen = _tool("stubgen")
PYTHON_TREES = ("src/anyio_asyncssl", "tests", "benchmarks", "examples", "fuzz")
LIB_NAME = re.compile(r"\blib\.([A-Za-z_]\w*)")


def declared_names() -> set[str]:
    return stubgen.declarations(*stubgen.cdef_parts()).names()


def used_names() -> dict[str, list[str]]:
    """``lib.<name>`` in our Python code: name -> the files using it."""
    used: dict[str, list[str]] = {}
    for tree in PYTHON_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "_native" in path.parts:
                continue
            for name in set(LIB_NAME.findall(path.read_text(encoding="utf-8"))):
                used.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return used


def test_the_committed_stub_is_what_the_header_generates() -> None:
    committed = Path(stubgen.STUB).read_text(encoding="utf-8")
    assert committed == stubgen.generate(), (
        "src/anyio_asyncssl/_native/_openssl.pyi is stale: "
        "run python src/anyio_asyncssl/_native/stubgen.py")


def test_every_lib_name_the_python_code_uses_is_declared() -> None:
    used = used_names()
    assert "asx_step" in used          # the scan finds the hot path
    declared = declared_names()
    missing = {name: files for name, files in used.items() if name not in declared}
    assert not missing, f"lib names used but not in the cdef: {missing}"


def test_the_compiled_module_offers_exactly_the_declared_names() -> None:
    assert set(dir(compiled_lib)) == declared_names()


def test_cffi_sees_the_fields_python_reads_of_a_connection_and_no_others() -> None:
    fields = {name for name, _ in compiled_ffi.typeof("struct asx_conn").fields}
    assert {"ssl", "id", "pending_op", "async_mode", "read_buf", "write_buf", "write_len",
            "write_cap", "wakeups", "retries"} <= fields
    assert not fields & {"rbio", "wbio", "notifier", "own_read", "job_errors"}


def test_the_header_constants_are_checked_against_the_compiler() -> None:
    # the cdef gives their values; cffi compares them with the C macros
    assert compiled_lib.ASX_DONE == 0 and compiled_lib.ASX_WANT_WRITE == 7
    assert compiled_lib.ASX_OP_SHUTDOWN == 4


def write_header(tmp_path: Path, body: str) -> str:
    path = tmp_path / "h.h"
    path.write_text(body, encoding="utf-8")
    return str(path)


def test_the_header_reader_keeps_only_the_marked_blocks_and_their_lines(tmp_path: Path) -> None:
    path = write_header(tmp_path, "\n".join([
        "#include <x.h>",
        "int hidden(void);",
        "/* cffi: begin */",
        "#define ONE 1",
        "struct s {",
        "    int seen;",
        "#ifdef ASX_CFFI",
        "    ...;",
        "#else",
        "    int own;",
        "#endif",
        "};",
        "int shown(struct s *p);",
        "/* cffi: end */",
        "int hidden_too(void);",
    ]))
    lines = build.header_cdef(path).splitlines()
    assert len(lines) == 15                       # the header's line numbers
    kept = [line.strip() for line in lines if line.strip()]
    assert kept == ["#define ONE 1", "struct s {", "int seen;", "...;", "};",
                    "int shown(struct s *p);"]


@pytest.mark.parametrize("body", [
    "/* cffi: begin */\nint f(void);\n",                          # not closed
    "int f(void);\n/* cffi: end */\n",                            # no begin
    "/* cffi: begin */\n/* cffi: begin */\n/* cffi: end */\n",    # nested
    "/* cffi: begin */\n#include <x.h>\n/* cffi: end */\n",       # cffi reads no #include
    "/* cffi: begin */\n#ifdef OTHER\n#endif\n/* cffi: end */\n",  # only ASX_CFFI
    "/* cffi: begin */\n#ifdef ASX_CFFI\n/* cffi: end */\n",      # #ifdef not closed
])
def test_the_header_reader_refuses_what_cffi_could_not_read(tmp_path: Path, body: str) -> None:
    with pytest.raises(ValueError):
        build.header_cdef(write_header(tmp_path, body))
