"""``python -m pyknn``: the same as the ``pyknn`` command."""
import sys

from .cli import main

sys.exit(main())
