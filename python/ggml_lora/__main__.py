"""``python -m ggml_lora`` runs the ``ggml-lora`` command line."""

import sys

from .cli import main

sys.exit(main())
