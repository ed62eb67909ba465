"""``python -m scanjobs.client``: the same as the ``scanjobs`` command."""

import sys

from .cli import main

sys.exit(main())
