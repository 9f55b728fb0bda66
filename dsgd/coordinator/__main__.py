"""``python -m dsgd.coordinator [--port P] ...``: run the coordinator."""

import sys

from dsgd.coordinator.process import main

sys.exit(main())
