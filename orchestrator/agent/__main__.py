"""``python -m orchestrator.agent``: the container entrypoint and local agent process."""

import sys

from orchestrator.agent import beat

signals = beat.hold_signals()  # a SIGTERM during start-up still means "stop politely"
beat.early(sys.argv[1:])  # alive before the heavy imports (see beat.py)

from orchestrator.agent.agent import main  # noqa: E402

raise SystemExit(main(early_signals=signals))
