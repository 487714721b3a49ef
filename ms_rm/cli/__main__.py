"""`python -m ms_rm.cli` is `ms-rm`."""

import sys

from . import main

sys.exit(main())
