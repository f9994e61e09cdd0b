"""``python -m ncutfast.bench``: the benchmark harness's command line."""

from .cli import main

raise SystemExit(main())
