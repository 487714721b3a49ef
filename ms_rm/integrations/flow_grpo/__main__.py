"""`python -m ms_rm.integrations.flow_grpo`: the launcher (ms_rm.integrations.flow_grpo.launcher)."""

import logging
import sys

from ms_rm.integrations.flow_grpo.launcher import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
