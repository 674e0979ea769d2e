"""`python -m rwkv_clip_hf.evaluation ...` is the same as `rwkv-clip-eval ...`."""

import sys

from .cli import main

sys.exit(main())
