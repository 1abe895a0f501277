"""``python -m tasks.cli``: the ``clipmask`` command (how ``clipmask worker`` starts its children)."""

import sys

from tasks.cli import main

sys.exit(main())
