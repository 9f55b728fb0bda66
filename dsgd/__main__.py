"""``python -m dsgd`` is the ``dsgd`` command."""

import sys

from dsgd.cli import main

sys.exit(main())
