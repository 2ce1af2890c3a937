"""Pick the few inputs of a fuzz run that add the most coverage to the seeds.

``-merge=1`` keeps every input with a feature of its own: with the outcome
feedback of ``fuzz_connection.py`` that is well over a thousand files.  The
repository keeps the seeds and a few dozen of them, chosen greedily (each
pick covers the most edges that the seeds and earlier picks do not) from
the merge's control file::

    python fuzz/fuzz_connection.py -merge=1 -merge_control_file=/tmp/mcf /tmp/merged INPUTS...
    python fuzz/pick_corpus.py /tmp/mcf 20

Picked files are copied into ``fuzz/corpus/`` under their SHA-1 (libFuzzer's
names); the corpus's and ``fuzz/crashes/``'s files are recognised by content,
whatever the merge named them.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
CRASHES = Path(__file__).parent / "crashes"


def edges_per_file(control_file: Path) -> dict[Path, set[int]]:
    """The ``COV`` lines of a libFuzzer merge control file, by input file."""
    lines = control_file.read_text().splitlines()
    count = int(lines[0])
    files = [Path(name) for name in lines[2:2 + count]]
    edges: dict[Path, set[int]] = {}
    for line in lines[2 + count:]:
        if line.startswith("COV "):
            _, index, *pcs = line.split()
            edges[files[int(index)]] = {int(pc) for pc in pcs}
    return edges


def pick(edges: dict[Path, set[int]], kept: set[str], how_many: int) -> list[Path]:
    """Greedy: the inputs adding most edges to those of ``kept`` (SHA-1s of contents)."""
    def digest(path: Path) -> str:
        return hashlib.sha1(path.read_bytes()).hexdigest()

    candidates = {path: pcs for path, pcs in edges.items() if digest(path) not in kept}
    covered: set[int] = set()
    for path, pcs in edges.items():
        if path not in candidates:
            covered |= pcs
    chosen: list[Path] = []
    for _ in range(min(how_many, len(candidates))):
        best = max(candidates, key=lambda p: (len(candidates[p] - covered), -p.stat().st_size))
        if not candidates[best] - covered:
            break
        covered |= candidates.pop(best)
        chosen.append(best)
    return chosen


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit("usage: pick_corpus.py MERGE_CONTROL_FILE HOW_MANY")
    kept = {hashlib.sha1(p.read_bytes()).hexdigest()
            for p in (*CORPUS.iterdir(), *CRASHES.iterdir())}
    for path in pick(edges_per_file(Path(argv[1])), kept, int(argv[2])):
        data = path.read_bytes()
        (CORPUS / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"picked {path.name} ({len(data)} bytes)")


if __name__ == "__main__":
    main(sys.argv)
