"""`python -m tokenprune.cli`, the same as the `tokenprune` command."""
import sys

from tokenprune.cli import main

sys.exit(main())
