"""``python -m client``: the same as the ``scanjobs`` command."""

import sys

from client.cli import main

sys.exit(main())
