"""`s2lpo train` as a plain script, so tests/distributed/launch.py can start it on each rank."""

import sys

from megatron_s2lpo.trainer.run import main

sys.exit(main())
