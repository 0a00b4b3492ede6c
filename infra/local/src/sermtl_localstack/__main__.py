"""`python -m sermtl_localstack up|down|status`."""

import sys

from sermtl_localstack.cli import main

sys.exit(main())
