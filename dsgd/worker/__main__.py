"""``python -m dsgd.worker --coordinator HOST:PORT``: join a cluster as one model replica."""

import sys

from dsgd.worker.process import main

sys.exit(main())
