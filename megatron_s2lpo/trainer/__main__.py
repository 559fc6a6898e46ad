"""`python -m megatron_s2lpo.trainer CONFIG [overrides] [--resume]` (also under torchrun)."""

import sys

from megatron_s2lpo.trainer.run import main

sys.exit(main())
