"""`python -m graylane.controlplane.cli`: the `graylane` command without its installed script."""

import sys

from graylane.controlplane.cli.commands import main

sys.exit(main())
