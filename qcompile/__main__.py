"""`python -m qcompile ...` (and `torchrun ... -m qcompile train ...`): the command line."""
import sys

from qcompile.tools.cli import main

sys.exit(main())
