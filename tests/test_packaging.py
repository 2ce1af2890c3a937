"""What a non-editable install ships: every subpackage of src/anyio_asyncssl.

setuptools' explicit package list does not pick up a new subpackage by itself;
a missing one works in the editable install the tests use and breaks the
README's first command (``pip install '.[trio]' && asyncssl serve``).
"""

from __future__ import annotations

import re
from pathlib import Path

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
