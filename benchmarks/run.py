"""The benchmark harness's command line: ``python benchmarks/run.py --help``.

The harness itself is the package ``anyio_asyncssl.bench`` (shared with
``asyncssl bench``); this writes RESULTS.md, results.json and results.png
here, in benchmarks/, unless ``--out`` says otherwise.
"""

from pathlib import Path

from anyio_asyncssl.bench.run import main

if __name__ == "__main__":
    main(default_out=Path(__file__).resolve().parent)
