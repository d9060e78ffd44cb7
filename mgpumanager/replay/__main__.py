"""``python -m mgpumanager.replay``: see :mod:`mgpumanager.replay.run`."""

from mgpumanager.replay.run import main

raise SystemExit(main())
