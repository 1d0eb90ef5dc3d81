"""``python -m lorafit``: the CLI (also what torchrun and accelerate launch run)."""

from lorafit.cli import main

raise SystemExit(main())
