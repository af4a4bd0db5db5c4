"""`python -m videolm.cli` (what torchrun and the tests call)."""

import sys

from . import main

sys.exit(main())
