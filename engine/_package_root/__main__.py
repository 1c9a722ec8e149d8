"""`python -m hayabusa ...`: the `hayabusa` command."""

import sys

from hayabusa.engine.cli import main

sys.exit(main())
