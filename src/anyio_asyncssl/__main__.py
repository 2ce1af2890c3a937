"""``python -m anyio_asyncssl`` is the ``asyncssl`` command."""

import sys

from .cli import main

sys.exit(main())
