#!/usr/bin/env python
"""Embed microscopy image files with a CDCL checkpoint: `python hub/embed_images.py --help`.

A thin wrapper; the command is `cdcl_hf.commands.embed` (installed as `cdcl-embed`).
"""

import sys

from cdcl_hf.commands.embed import main

if __name__ == "__main__":
    sys.exit(main())
