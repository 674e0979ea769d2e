"""`python -m rwkv_clip_hf.data ...` is the same as `rwkv-clip-data ...`."""

import sys

from .cli import main

sys.exit(main())
