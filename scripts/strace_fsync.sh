#!/usr/bin/env bash
# Proves the group commit: one fdatasync of the sled `db` file per batch of appends.
#
# Runs the server under strace (fdatasync, fsync, sync_file_range, with file names), logs in,
# sends N commands from C concurrent HTTP clients, then compares
#   - fdatasync calls on <data>/ledger/db during the load (strace), with
#   - the batches the writer committed during the load
#     (alarm_ledger_group_commit_batch_size_count from /metrics).
# Login and its security-log sync happen before the first count, so the two must be equal.
#
# Usage: scripts/strace_fsync.sh [N] [C]        (defaults: 2000 commands, 32 clients)
# Env:   BIN=path/to/alarm-ledger (default: target/debug/alarm-ledger, built if missing)
# Needs: strace (apt-get install -y strace), python3, curl. Exit 0 when equal, 1 otherwise.
set -euo pipefail

N=${1:-2000}
C=${2:-32}
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/alarm-ledger}
if [[ ! -x "$BIN" ]]; then
    cargo build --bin alarm-ledger
fi
command -v strace >/dev/null || { echo "strace is missing: apt-get install -y strace" >&2; exit 2; }

TMP=$(mktemp -d)
STRACE_PID=
cleanup() {
    if [[ -n "$STRACE_PID" ]]; then
        kill -9 $(pgrep -P "$STRACE_PID" 2>/dev/null) 2>/dev/null || true
        wait "$STRACE_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

PASSWORD=strace-admin-password
ALARM_LEDGER_ADMIN_PASSWORD=$PASSWORD \
ALARM_LEDGER_JWT_SECRET=strace-secret-strace-secret-strace-0123 \
    strace -f -y -qq -e trace=fdatasync,fsync,sync_file_range -o "$TMP/strace.log" \
    "$BIN" --log-format json serve --data "$TMP/data" --listen 127.0.0.1:0 \
    2>"$TMP/server.log" &
STRACE_PID=$!

ADDR=
for _ in $(seq 1 300); do
    ADDR=$(python3 - "$TMP/server.log" <<'EOF' || true
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("message") == "alarm-ledger listening":
        print(v["addr"])
        break
EOF
)
    [[ -n "$ADDR" ]] && break
    sleep 0.1
done
[[ -n "$ADDR" ]] || { echo "server did not start:" >&2; cat "$TMP/server.log" >&2; exit 2; }
BASE="http://$ADDR"

TOKEN=$(curl -sf -X POST "$BASE/api/v1/login" -H 'content-type: application/json' \
    -d "{\"username\":\"admin\",\"password\":\"$PASSWORD\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

metric() {
    curl -sf "$BASE/metrics" | awk -v m="$1" '$1 == m { print int($2) }'
}
db_syncs() {
    grep -cE 'fdatasync\([0-9]+<[^>]*/ledger/db>' "$TMP/strace.log" || true
}

sleep 0.3 # let strace write out the start-up syncs
SYNC0=$(db_syncs)
BATCH0=$(metric alarm_ledger_group_commit_batch_size_count)
SUM0=$(metric alarm_ledger_group_commit_batch_size_sum)

START=$(date +%s.%N)
python3 - "$BASE" "$TOKEN" "$N" "$C" <<'EOF'
import http.client, json, sys, threading, uuid
base, token, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host = base.removeprefix("http://")
lock = threading.Lock()
left = [n]
failures = []

def worker():
    conn = http.client.HTTPConnection(host, timeout=30)
    while True:
        with lock:
            if left[0] == 0:
                return
            left[0] -= 1
        body = json.dumps({"name": "strace", "command_id": str(uuid.uuid4())})
        conn.request("POST", "/api/v1/alarms", body,
                     {"authorization": "Bearer " + token, "content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            failures.append((r.status, data[:200]))

threads = [threading.Thread(target=worker) for _ in range(c)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    print("failed commands:", len(failures), failures[:3], file=sys.stderr)
    sys.exit(1)
EOF
END=$(date +%s.%N)

sleep 0.5 # strace output of the last syncs
BATCH1=$(metric alarm_ledger_group_commit_batch_size_count)
SUM1=$(metric alarm_ledger_group_commit_batch_size_sum)
SYNC1=$(db_syncs)

SERVER_PID=$(pgrep -P "$STRACE_PID")
kill -TERM "$SERVER_PID"
wait "$STRACE_PID" || true
STRACE_PID=

BATCHES=$((BATCH1 - BATCH0))
EVENTS=$((SUM1 - SUM0))
SYNCS=$((SYNC1 - SYNC0))
FSYNC_ALL=$(grep -c 'fsync(' "$TMP/strace.log" | tr -d ' ' || true)
SFR_ALL=$(grep -c 'sync_file_range(' "$TMP/strace.log" | tr -d ' ' || true)
FDS_ALL=$(grep -c 'fdatasync(' "$TMP/strace.log" | tr -d ' ' || true)

echo "commands sent:            $N from $C concurrent clients in $(python3 -c "print(f'{$END-$START:.2f}')") s"
echo "events appended (metric): $EVENTS"
echo "group commits (metric):   $BATCHES  (mean batch $(python3 -c "print(f'{$EVENTS/max($BATCHES,1):.1f}')"))"
echo "fdatasync on ledger/db:   $SYNCS  (during the load)"
echo "whole run, all files:     fdatasync $FDS_ALL, fsync $FSYNC_ALL, sync_file_range $SFR_ALL"
if [[ "$EVENTS" -ne "$N" ]]; then
    echo "FAIL: $N commands but $EVENTS events appended" >&2
    exit 1
fi
if [[ "$SYNCS" -eq "$BATCHES" ]]; then
    echo "OK: one fdatasync per group commit"
else
    echo "FAIL: $SYNCS fdatasync calls for $BATCHES group commits" >&2
    exit 1
fi
