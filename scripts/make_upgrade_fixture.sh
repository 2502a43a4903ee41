#!/usr/bin/env bash
# Build the upgrade fixture: a data dir written by an EARLIER commit of this project
# (tests/e2e/test_upgrade_fixture.py opens it with the current code).
#
#   scripts/make_upgrade_fixture.sh [COMMIT] [PYTHON]
#
# COMMIT (default 9708206, the last commit before schema versions) is exported with
# `git archive` into a temporary folder (the repository is only read) and run from
# there: `orchestrator run` answers three messages (delivered history), stops; then
# three more messages are sent while nothing runs (pending work), and one session's
# agent "answers" two messages while nothing runs (replies written to its
# outbound.db, never delivered). The data dir is packed into
# tests/fixtures/upgrade-<COMMIT>.tar.gz with the message ids in manifest.json.
set -euo pipefail

commit=${1:-9708206}
python=${2:-${PYTHON:-python3}}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill "${run_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

git -C "$repo" archive "$commit" | tar -x -C "$work" --one-top-level=src
mkdir "$work/fixture"
cd "$work/fixture"
cat > config.toml <<'EOF'
data_dir = "data"

[runtime]
command = ["{python}", "-m", "orchestrator.agent", "--poll-interval", "0.02", "--heartbeat-interval", "0.1"]
on_shutdown = "stop"

[lifecycle]
idle_after = 0.5
stop_idle_after = 0.5

[api]
listen = ""
EOF
orch() { PYTHONPATH="$work/src" "$python" -m orchestrator "$@"; }
send() { orch send --config config.toml --json --group "$1" "$2"; }

# not through orch(): $! must be the orchestrator's own pid, not a subshell's
PYTHONPATH="$work/src" "$python" -m orchestrator run --config config.toml > run.log 2>&1 &
run_pid=$!
for _ in $(seq 100); do grep -q "orchestrator up" run.log && break; sleep 0.1; done
delivered=()
for i in 1 2 3; do delivered+=("$(send "g$i" "answered before the upgrade $i")"); done
for _ in $(seq 300); do
  [ "$(wc -l < data/delivered.jsonl 2>/dev/null || echo 0)" -ge 3 ] && break; sleep 0.1
done
kill -TERM "$run_pid"; wait "$run_pid" || true; run_pid=
[ "$(wc -l < data/delivered.jsonl)" -eq 3 ] || { cat run.log; exit 1; }

pending=()
for i in 1 2 3; do pending+=("$(send "g$i" "pending at the upgrade $i")"); done
# an agent that answered two messages while no orchestrator ran: its replies are
# in outbound.db, not delivered
answered=()
for i in 1 2; do answered+=("$(send "g4" "answered while down $i")"); done
PYTHONPATH="$work/src" "$python" - "${answered[@]}" <<'EOF'
import glob, json, sqlite3, sys
from orchestrator.contract import schema
[folder] = glob.glob("data/sessions/g4/*/")
schema.init_outbound(folder + "outbound.db")
conn = sqlite3.connect(folder + "outbound.db")
for k, sent in enumerate(sys.argv[1:]):
    mid = json.loads(sent)["message_id"]  # seq: odd, above every inbound row
    conn.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, content)"
                 " VALUES (?,?,?,?,?,?)", (f"out-down-{k}", 101 + 2 * k, mid, schema.now_ts(),
                 "chat", json.dumps({"text": f"reply written while down {k}"})))
    conn.execute("INSERT INTO processing_ack (message_id, status, status_changed)"
                 " VALUES (?, 'completed', ?)", (mid, schema.now_ts()))
conn.commit()
EOF

ids() { for j in "$@"; do printf '%s\n' "$j"; done | "$python" -c \
  'import json,sys; print(json.dumps([json.loads(l)["message_id"] for l in sys.stdin]))'; }
cat > data/fixture.json <<EOF
{"commit": "$(git -C "$repo" rev-parse "$commit")",
 "delivered": $(ids "${delivered[@]}"),
 "pending": $(ids "${pending[@]}"),
 "answered_while_down": $(ids "${answered[@]}")}
EOF
out="$repo/tests/fixtures/upgrade-$commit.tar.gz"
mkdir -p "$(dirname "$out")"
tar --sort=name --owner=0 --group=0 --numeric-owner --exclude=data/space-reserve \
  --exclude=data/orchestrator.lock -czf "$out" data  # (the reserve: made again at start)
echo "wrote $out"
