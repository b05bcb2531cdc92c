"""``python -m client``: the same as the ``meshnode`` command."""

from .cli import main

raise SystemExit(main())
