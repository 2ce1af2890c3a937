"""What a non-editable install ships: every subpackage of src/anyio_asyncssl.

setuptools' explicit package list does not pick up a new subpackage by itself;
a missing one works in the editable install the tests use and breaks the
README's first command (``pip install '.[trio]' && asyncssl serve``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_package_list() -> None:
    # (tomllib is 3.11+; the [tool.setuptools] list is the first `packages = [...]`)
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^\[tool\.setuptools\]\n(?:.*\n)*?packages = \[(.*)\]", text, re.M)
    assert m is not None
    listed = set(re.findall(r'"([^"]+)"', m.group(1)))
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts)
             for p in (src / "anyio_asyncssl").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


# --- the build stops before compiling when OpenSSL's headers are missing or old

MESSAGE_LINES = (
    "apt-get install libssl-dev",
    "dnf install openssl-devel",
    "apk add openssl-dev",
    "ASYNCSSL_OPENSSL_DIR=",
)


def _pip_wheel(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`pip wheel` of a copy of this tree (no build isolation: the test extra has
    setuptools and cffi; a copy, so no earlier build in build/ is reused)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns(
        "*.so", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "README.md", "LICENSE",
                 "MANIFEST.in"):
        shutil.copy(ROOT / name, tree / name)
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-w", str(tmp_path / "out"), str(tree)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1", **env}, check=False)


@pytest.fixture
def old_openssl(tmp_path: Path) -> Path:
    """A prefix with OpenSSL 1.1.1's opensslv.h (all the probe reads)."""
    inc = tmp_path / "old" / "include" / "openssl"
    inc.mkdir(parents=True)
    (inc / "opensslv.h").write_text(
        "# define OPENSSL_VERSION_NUMBER  0x1010117fL\n"
        '# define OPENSSL_VERSION_TEXT    "OpenSSL 1.1.1w  11 Sep 2023"\n')
    return tmp_path / "old"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no headers", "empty prefix", "OpenSSL 1.1.1"])
def test_a_build_without_openssl_3_headers_stops_before_compiling_and_says_what_to_do(
        case: str, tmp_path: Path, old_openssl: Path) -> None:
    pytest.importorskip("setuptools", minversion="77",
                        reason="pip install -e '.[test]' installs setuptools>=77")
    env = {"no headers": {"CC": "gcc -nostdinc"},   # a compiler that sees no headers at all
           "empty prefix": {"ASYNCSSL_OPENSSL_DIR": str(tmp_path)},
           "OpenSSL 1.1.1": {"ASYNCSSL_OPENSSL_DIR": str(old_openssl)}}[case]
    out = _pip_wheel(tmp_path, **env)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "anyio-asyncssl: cannot build:" in text, text[-3000:]
    for line in MESSAGE_LINES:
        assert line in text
    why = {"no headers": "headers were not found", "empty prefix": "has no include/openssl",
           "OpenSSL 1.1.1": "older than 3.0 (OpenSSL 1.1.1w"}[case]
    assert why in text
    # nothing was compiled: setuptools never reached the extension
    assert "building 'anyio_asyncssl._native._openssl' extension" not in text
    assert not list(tmp_path.glob("out/*.whl"))


def _native_build() -> Any:
    """The cffi build script, loaded by path ("build" is also pypa's build, a test extra)."""
    spec = importlib.util.spec_from_file_location(
        "asx_native_build", ROOT / "src" / "anyio_asyncssl" / "_native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_reads_the_version_of_the_headers_it_compiles_against() -> None:
    text = _native_build().find_openssl()
    assert text.startswith("OpenSSL 3.") or text.startswith("OpenSSL 4."), text
    # the library we run with is the one we built against (same major version)
    import anyio_asyncssl
    assert anyio_asyncssl.OPENSSL_VERSION.split()[1].split(".")[0] == text.split()[1].split(".")[0]


def test_the_docs_quote_the_builds_message_as_it_is() -> None:
    native_build = _native_build()
    page = (ROOT / "docs" / "installing.md").read_text()
    for line in native_build.MISSING.splitlines()[1:]:   # (the first names the problem)
        assert line in page, line


@pytest.mark.slow
def test_asyncssl_openssl_dir_builds_against_that_prefix_and_loads_its_libraries(
        tmp_path: Path) -> None:
    """A prefix laid out as ``make install_sw`` does (include/openssl, lib64/), here
    made of links to this machine's OpenSSL: the build compiles with its headers,
    links its lib64 and records it as the extension's run path."""
    pytest.importorskip("setuptools", minversion="77",
                        reason="pip install -e '.[test]' installs setuptools>=77")
    import anyio_asyncssl._native._openssl as native

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    needed = subprocess.run(["ldd", native.__file__], capture_output=True, text=True,
                            check=True, env=env).stdout
    prefix = tmp_path / "openssl"
    (prefix / "include").mkdir(parents=True)
    (prefix / "lib64").mkdir()
    probe = subprocess.run(["gcc", "-E", "-x", "c", "-"], input="#include <openssl/opensslv.h>\n",
                           capture_output=True, text=True, check=True).stdout
    found = re.search(r'^# \d+ "([^"]*/openssl)/opensslv\.h"', probe, re.M)
    assert found, probe[:500]
    (prefix / "include" / "openssl").symlink_to(found.group(1))
    for name in ("ssl", "crypto"):
        linked = re.search(rf"lib{name}\.so\.\d+ => (\S+)", needed)
        assert linked, needed
        (prefix / "lib64" / f"lib{name}.so").symlink_to(linked.group(1))
    out = _pip_wheel(tmp_path, ASYNCSSL_OPENSSL_DIR=str(prefix))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (wheel,) = (tmp_path / "out").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        (so,) = [n for n in z.namelist() if n.endswith(".abi3.so")]
        z.extract(so, tmp_path / "x")
    dynamic = subprocess.run(["readelf", "-d", str(tmp_path / "x" / so)],
                             capture_output=True, text=True, check=True).stdout
    assert str(prefix / "lib64") in dynamic, dynamic
