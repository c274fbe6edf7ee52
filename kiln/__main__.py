"""`python -m kiln`: the same as the `kiln` command."""
import sys

from .cli import main

sys.exit(main())
