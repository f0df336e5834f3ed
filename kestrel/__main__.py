"""`python -m kestrel ...` is the `kestrel` command."""

import sys

from kestrel.entrypoints.cli import main

sys.exit(main())
