"""``python -m kfac_lens.bench NAME``: the same as ``kfac-lens bench NAME``."""

from . import main

raise SystemExit(main())
