"""``python -m dsgd.shard --coordinator HOST:PORT --shard-id K``: run one parameter shard."""

import sys

from dsgd.shard.process import main

sys.exit(main())
