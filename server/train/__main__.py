from __future__ import annotations

from server.train.cli import main

raise SystemExit(main())
