"""``python -m orchestrator.agent``: the container entrypoint and local agent process."""

from orchestrator.agent.agent import main

raise SystemExit(main())
