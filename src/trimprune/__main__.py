"""`python -m trimprune ...`: the command line."""

import sys

from trimprune.cli import main

sys.exit(main())
