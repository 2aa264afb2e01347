#!/usr/bin/env bash
# The whole benchmark suite of issue 7, on this machine (2 cores: ≤ 20 minutes).
#
#   scripts/bench.sh           full sizes (the issue's): the numbers for the README
#   scripts/bench.sh --quick   tiny sizes, a few minutes after the build: checks the pipeline only
#                              (writes bench-results/latest-quick.md; never docs/bench-latency.png)
#
# Steps: release build → raw disk baseline (4 KiB write + fdatasync) → criterion suite
# (benches/core.rs) → alarm-ledger server on 127.0.0.1 with a fresh data directory → W1 (1/16/64
# clients), W2 (1,000,000 events), W3 (100 subs @ 1,000/s, 1,000 subs @ 100/s), W4 (1,000
# clients) → restart → 10,000 idle connections → Redis Streams (appendfsync always) W1/W2/W3 →
# compliance (export, verify, process start, online backup) → bench-results/<date>-<commit>.jsonl,
# bench-results/latest.md, docs/bench-latency.png.
#
# Everything runs on loopback; every step is bounded in time (`timeout`, and the load generator's
# own `--timeout`), and the suite has an overall deadline (BENCH_BUDGET_SECS, default 1200 s: the
# 20 minutes): a step is not started after it, a running step is cut at it (its row records the
# error), the report is still written and the script exits 1. Work files go to a
# temporary directory under target/ (the real disk: never measure a tmpfs), removed at the end
# (KEEP_WORK=1 keeps it). Set BENCH_WORK_PARENT to measure another disk.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

if [[ $QUICK == 1 ]]; then
  W1_CLIENTS="1 4"; W1_SECS=2; W2_EVENTS=10000; W3_RUNS="10:200"; W3_SECS=2
  W4_CLIENTS=20; IDLE_CONNS=100; DISK_SECS=1; LOGIN_PAIRS=1
  export LEDGER_BENCH_EVENTS=20000 LEDGER_BENCH_ALARMS=1000 LEDGER_BENCH_TIME_SCALE=0.05
else
  W1_CLIENTS="1 16 64"; W1_SECS=10; W2_EVENTS=1000000; W3_RUNS="100:1000 1000:100"; W3_SECS=10
  W4_CLIENTS=1000; IDLE_CONNS=10000; DISK_SECS=5; LOGIN_PAIRS=3
fi

STARTED=$(date +%s)
BUDGET=${BENCH_BUDGET_SECS:-1200}
DEADLINE=$((STARTED + BUDGET))
DATE=$(date -u +%Y%m%d-%H%M%S)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]]; then
  COMMIT="$COMMIT-dirty"
fi
mkdir -p bench-results
NAME="$DATE-$COMMIT"
[[ $QUICK == 1 ]] && NAME="$NAME-quick"
OUT="$ROOT/bench-results/$NAME.jsonl"
LOG="$ROOT/bench-results/$NAME.log"
: >"$OUT"
: >"$LOG"
mkdir -p "${BENCH_WORK_PARENT:-$ROOT/target}"
WORK=$(mktemp -d "${BENCH_WORK_PARENT:-$ROOT/target}/bench-work.XXXXXX")

log() { echo "[bench $(date +%H:%M:%S) +$(($(date +%s) - STARTED))s] $*" | tee -a "$LOG" >&2; }

# bounded CAP: the seconds a step may run: CAP, but never past the suite's deadline.
bounded() {
  local cap=$1 left=$((DEADLINE - $(date +%s)))
  ((left < cap)) && cap=$left
  ((cap < 1)) && cap=1
  echo "$cap"
}
# in_time STEP: false, with an error row in the results, once the deadline has passed.
OVER=0
in_time() {
  (($(date +%s) < DEADLINE)) && return 0
  log "deadline of $BUDGET s passed: $1 not run"
  echo "{\"workload\":\"suite\",\"target\":\"ledger\",\"error\":\"deadline of $BUDGET s passed before $1\"}" >>"$OUT"
  OVER=1
  return 1
}
# timeout(1) puts the command in its own process group and signals the whole group, so the bench
# executables under cargo and the servers they start are stopped too.
TMO=(timeout --kill-after=10)

SERVER_PID=""
REDIS_PID=""
stop_pid() { # pid: TERM, wait up to 20 s, then KILL
  local pid=$1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$SERVER_PID"
  stop_pid "$REDIS_PID"
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "work files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------------ build
log "building (release)"
"${TMO[@]}" "$(bounded 900)" cargo build --release --bin alarm-ledger 2>>"$LOG"
SERVER_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/alarm-ledger"
LOAD=$("${TMO[@]}" "$(bounded 900)" cargo bench --bench load --no-run --message-format=json 2>>"$LOG" | python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "load" and m.get("executable"):
        exe = m["executable"]
print(exe or "")')
[[ -x "$LOAD" ]] || { log "cannot find the load generator executable"; exit 1; }
"${TMO[@]}" "$(bounded 900)" cargo bench --bench core --no-run 2>>"$LOG"
"${TMO[@]}" "$(bounded 900)" cargo bench --bench compliance --no-run 2>>"$LOG"

# Many sockets: idle connections, the storm (server and generator both inherit this).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [[ "$NOFILE" != unlimited && "$NOFILE" -lt $((IDLE_CONNS + 1000)) ]]; then
  log "ulimit -n is $NOFILE: idle connections reduced"
  IDLE_CONNS=$((NOFILE - 1000))
fi

# Redis for the comparison, installed before the machine line records its version.
if ! command -v redis-server >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && (($(date +%s) < DEADLINE)); then
    log "installing redis-server (Debian)"
    { timeout 300 apt-get update && timeout 300 apt-get install -y redis-server; } >>"$LOG" 2>&1 || true
  fi
fi

# ------------------------------------------------------------------ machine
python3 - "$DATE" "$COMMIT" "$WORK" >>"$OUT" <<'EOF'
import json, os, platform, subprocess, sys
date, commit, work = sys.argv[1:4]
cpu = "?"
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"):
            cpu = l.split(":", 1)[1].strip(); break
except OSError:
    pass
mem = "?"
try:
    for l in open("/proc/meminfo"):
        if l.startswith("MemTotal"):
            mem = round(int(l.split()[1]) / 1024 / 1024, 1); break
except OSError:
    pass
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"
fs = run("df", "--output=fstype,source", work).splitlines()[-1:] or ["?"]
print(json.dumps({"workload": "meta", "target": "machine", "date": date, "commit": commit,
                  "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "kernel": platform.release(),
                  "rustc": run("rustc", "--version"), "fs": " ".join(fs[0].split()),
                  "redis": run("redis-server", "--version") or None}))
EOF

# ------------------------------------------------------------------ helpers
# run_load LABEL ARGS...: one JSON line into $OUT; a failure is recorded and the suite goes on.
run_load() {
  local label=$1; shift
  in_time "$label" || return 0
  log "load: $label"
  local line rc=0
  # A backstop above the generator's own --timeout (≤ 420 s here), cut at the deadline.
  line=$("${TMO[@]}" "$(bounded 480)" "$LOAD" "$@" --label "$label" 2>>"$LOG") || rc=$?
  if [[ -n "$line" ]]; then
    echo "$line" | tail -n 1 >>"$OUT"
    echo "$line" | tail -n 1 | cut -c1-400 >&2
  else
    echo "{\"workload\":\"$label\",\"error\":\"load generator exited $rc without output (124: timed out)\"}" >>"$OUT"
  fi
  [[ $rc == 0 ]] || log "  $label failed (exit $rc); see $LOG"
}

ADMIN_PW="bench-$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')"
JWT_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
export LEDGER_LOAD_PASSWORD="$ADMIN_PW"
SERVER_FLAGS="--ws-command-rate 1000000 --token-ttl 2h --log-format json"

start_server() {
  PORT=$(free_port)
  # shellcheck disable=SC2086
  "$SERVER_BIN" serve --data "$WORK/data" --listen "127.0.0.1:$PORT" \
    --admin-password "$ADMIN_PW" --jwt-secret "$JWT_SECRET" $SERVER_FLAGS \
    >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  URL="http://127.0.0.1:$PORT"
  for _ in $(seq 1 300); do
    if curl -fsS "$URL/readyz" >/dev/null 2>&1; then
      log "server pid $SERVER_PID on $URL"
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "server did not become ready"; tail -n 20 "$WORK/server.log" >&2; exit 1
}

# A server at rest: after a start from a projection snapshot it re-verifies the log prefix in
# the background (README, "Start-up integrity"), which fills sled's page cache; the idle runs
# wait for that, so that the RSS per connection is the connections' own.
wait_verified() {
  for _ in $(seq 1 1200); do
    if curl -sS "$URL/readyz" 2>/dev/null | grep -q '"integrity":"verified"'; then
      return 0
    fi
    sleep 0.1
  done
  log "start-up integrity check still running after 120 s; measuring anyway"
}

# ------------------------------------------------------------------ 1. raw disk
if in_time "disk-raw"; then
  log "raw disk: 4 KiB write + fdatasync for $DISK_SECS s in $WORK"
  "${TMO[@]}" "$(bounded $((DISK_SECS + 60)))" "$LOAD" disk-raw --dir "$WORK" --seconds "$DISK_SECS" \
    --label "disk_raw" >>"$OUT" 2>>"$LOG" || log "disk-raw failed"
  tail -n 1 "$OUT" >&2
fi

# ------------------------------------------------------------------ 2. criterion
if ! in_time "criterion"; then :
elif log "criterion suite (benches/core.rs)" && TMPDIR="$WORK" CRITERION_HOME="$WORK/criterion" \
    "${TMO[@]}" "$(bounded 600)" cargo bench --bench core -- --noplot \
    >"$ROOT/bench-results/$NAME.criterion.txt" 2>&1; then
  python3 scripts/plot_bench.py criterion "$WORK/criterion" | tee -a "$OUT" \
    | python3 -c 'import json,sys; [print("  %-60s %14s elements/s" % (d["bench"], format(round(d.get("elements_per_s") or 0), ",")), file=sys.stderr) for d in map(json.loads, sys.stdin)]'
else
  log "criterion failed or timed out; see bench-results/$NAME.criterion.txt"
  echo '{"workload":"criterion","error":"cargo bench --bench core failed or timed out"}' >>"$OUT"
fi

# ------------------------------------------------------------------ 3. alarm-ledger over WebSockets
if in_time "WebSocket runs"; then
  start_server
  COMMON=(--url "$URL" --server-pid "$SERVER_PID")
  for p in $W1_CLIENTS; do
    run_load "W1-$p" w1 "${COMMON[@]}" --timeout 120 --clients "$p" --seconds "$W1_SECS" --warmup 1
  done
  run_load "W2-$W2_EVENTS" w2 "${COMMON[@]}" --events "$W2_EVENTS" --prepare-clients 64 --timeout 420
  for run in $W3_RUNS; do
    subs=${run%%:*}; rate=${run##*:}
    run_load "W3-$subs@$rate" w3 "${COMMON[@]}" --timeout 180 --subscribers "$subs" --rate "$rate" --seconds "$W3_SECS"
  done
  # Issue 4: delivery latency while logins (PBKDF2, ~150 ms of CPU each) arrive at 20/s, in
  # alternating pairs with the same run without logins, so that the difference is read against the
  # run-to-run spread.
  for i in $(seq 1 "$LOGIN_PAIRS"); do
    run_load "W3-100@1000-base$i" w3 "${COMMON[@]}" --timeout 180 --subscribers 100 --rate 1000 \
      --seconds "$W3_SECS"
    run_load "W3-100@1000-logins20-$i" w3 "${COMMON[@]}" --timeout 180 --subscribers 100 --rate 1000 \
      --seconds "$W3_SECS" --logins-per-s 20
  done
  run_load "W4-$W4_CLIENTS" w4 "${COMMON[@]}" --timeout 180 --clients "$W4_CLIENTS" --rate 200 --before 2 --after 2
fi

if in_time "idle connections"; then
  # Idle connections on a freshly restarted server (same data): RSS of a server at rest.
  stop_pid "$SERVER_PID"; SERVER_PID=""
  # A server started on $WORK/data and at rest holds the connections; it is stopped after.
  idle_run() {
    start_server
    wait_verified
    sleep 1
    run_load "$1" idle --url "$URL" --server-pid "$SERVER_PID" --timeout 240 \
      --connections "$IDLE_CONNS" --hold 5
    stop_pid "$SERVER_PID"; SERVER_PID=""
  }
  log "restarting the server for the idle-connection run"
  idle_run "idle-$IDLE_CONNS"
  # The same on a new, empty ledger: the connections' own cost without the large ledger's sled
  # page table and cache (a 1M-event sled database alone takes ~175 MiB once opened).
  mv "$WORK/data" "$WORK/data-big"
  idle_run "idle-$IDLE_CONNS-fresh"
fi
stop_pid "$SERVER_PID"; SERVER_PID=""

# ------------------------------------------------------------------ 4. Redis Streams
if ! in_time "Redis Streams"; then :
elif command -v redis-server >/dev/null; then
  RPORT=$(free_port)
  mkdir -p "$WORK/redis"
  redis-server --port "$RPORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
    --appendfsync always --save '' --daemonize no --protected-mode yes --maxclients 20000 \
    >>"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null && break
    sleep 0.1
  done
  log "redis-server pid $REDIS_PID on 127.0.0.1:$RPORT (appendonly yes, appendfsync always)"
  RC=(--target redis --redis "127.0.0.1:$RPORT" --server-pid "$REDIS_PID" --timeout 300)
  for p in $W1_CLIENTS; do
    run_load "W1-$p-redis" w1 "${RC[@]}" --clients "$p" --seconds "$W1_SECS" --warmup 1
  done
  run_load "W2-$W2_EVENTS-redis" w2 "${RC[@]}" --events "$W2_EVENTS"
  for run in $W3_RUNS; do
    subs=${run%%:*}; rate=${run##*:}
    run_load "W3-$subs@$rate-redis" w3 "${RC[@]}" --subscribers "$subs" --rate "$rate" --seconds "$W3_SECS"
  done
  stop_pid "$REDIS_PID"; REDIS_PID=""
else
  log "redis-server not available: comparison skipped"
fi

# ------------------------------------------------------------------ 5. compliance (issue 5)
# Export and verify of a 1,000,000-event ledger with the real binary; the start of the server
# process on it (spawn → /readyz 200 after a clean stop, from a projection snapshot and with a
# full replay, each the first start after the write and once more: the start-up targets; and
# from the snapshot after a crash, with the shutdown checkpoint's cost); online backup while
# 1,000 events/s are appended (append latency during the backup, from the scheduled send time).
COMPLIANCE_EVENTS=1000000
[[ $QUICK == 1 ]] && COMPLIANCE_EVENTS=20000
# The online backup (POST /api/v1/admin/backup) runs inside it: cut with it by the timeout.
if in_time "compliance"; then
  log "compliance bench ($COMPLIANCE_EVENTS events)"
  if TMPDIR="$WORK" "${TMO[@]}" "$(bounded 600)" cargo bench --bench compliance -- \
      --events "$COMPLIANCE_EVENTS" 2>>"$LOG" | grep '^{' | tee -a "$OUT" >&2; then :; else
    echo '{"workload":"compliance","error":"cargo bench --bench compliance failed or timed out"}' >>"$OUT"
  fi
fi

# ------------------------------------------------------------------ 6. report
python3 - "$OUT" "$SERVER_FLAGS" <<'EOF'
import json, sys
path, flags = sys.argv[1:3]
rows = [l for l in open(path) if l.strip()]
for i, l in enumerate(rows):
    d = json.loads(l)
    if d.get("workload") == "meta":
        d["server_flags"] = flags
        rows[i] = json.dumps(d) + "\n"
open(path, "w").writelines(rows)
EOF
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib (pip)"
  timeout 300 python3 -m pip install --quiet matplotlib >>"$LOG" 2>&1 || log "matplotlib unavailable: no plot"
fi
if [[ $QUICK == 1 ]]; then # a smoke run never replaces the published results
  MD="bench-results/latest-quick.md"; PNG="bench-results/$NAME.png"
else
  MD="bench-results/latest.md"; PNG="docs/bench-latency.png"
fi
python3 scripts/plot_bench.py report "$OUT" --md "$MD" --png "$PNG"
log "done in $(($(date +%s) - STARTED)) s: $OUT, $MD, $PNG"
if ((OVER)) || (($(date +%s) > DEADLINE)); then
  log "the suite did not finish within $BUDGET s: results incomplete"
  exit 1
fi
