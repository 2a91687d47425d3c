"""``python -m streamckpt.cli``: the same as the ``streamckpt`` command."""

import sys

from streamckpt.cli import main

sys.exit(main())
