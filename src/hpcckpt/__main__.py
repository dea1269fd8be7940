"""``python -m hpcckpt run -n 4 -- python app.py`` is the same as ``hpcckpt run ...``."""
from hpcckpt.cli import main

raise SystemExit(main())
