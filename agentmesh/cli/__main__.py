"""``python -m agentmesh.cli``: the same program as ``agentmesh``."""

import sys

from agentmesh.cli.commands import main

sys.exit(main())
