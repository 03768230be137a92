#!/usr/bin/env python
"""Publish the demo Space (hub/space) for a published model: `python hub/push_space.py --help`.

A thin wrapper; the command is `cdcl_hf.commands.push_space` (installed as `cdcl-push-space`).
"""

import sys

from cdcl_hf.commands.push_space import main

if __name__ == "__main__":
    sys.exit(main())
