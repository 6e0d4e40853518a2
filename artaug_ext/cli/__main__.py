"""`python -m artaug_ext.cli ...` is `artaug ...` (what torchrun and accelerate launch run)."""

import sys

from . import main

sys.exit(main())
