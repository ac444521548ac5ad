#!/usr/bin/env bash
# Hot-SKU reservations/s and latency, 64 clients, on this machine in one run:
#   1. shelfsync-hub (cargo bench --bench reservations)
#   2. PostgreSQL: UPDATE stock SET qty = qty - 1 WHERE sku = $1 AND qty >= 1 (pgbench)
#   3. Redis: a check-and-decrement Lua script (redis-benchmark), appendfsync always
#   4. the limit of this machine for the hub's shape of work: limit-server (tests/src/bin), the
#      least server doing it (axum, the same JSON body, a bearer token, one decider thread owning
#      the stock in memory, one row per reservation group-committed to SQLite WAL FULL, 201 after
#      the commit), driven by the hub benchmark's own load generator (reserve-load)
# All durable (fsync per commit or group commit), all on loopback. The hub and the limit run
# SHELFSYNC_BENCH_ROUNDS (3) rounds of SHELFSYNC_BENCH_SECS (5) s and print medians; PostgreSQL
# runs SECS s. PostgreSQL and Redis come from Debian's packages; if a system cannot be built,
# installed or started, this says so and why, and goes on. Ends with the table and the hub's
# ratios to the limit (target >= 60 %) and to PostgreSQL (target >= 10x).
set -uo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0 # a failing run says why in a line, not a backtrace
CLIENTS=${CLIENTS:-64}
SECS=${SECS:-10}
work=$(mktemp -d /tmp/shelfsync-bench.XXXXXX)
cleanup() {
  [ -n "${PGBIN:-}" ] && (cd / && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1)
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null
  [ -n "${limit_pid:-}" ] && kill "$limit_pid" 2>/dev/null
  [ -n "${head_tree:-}" ] && git worktree remove --force "$head_tree" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Why a step failed, from its log: the first errors (compiler errors, panics) if there are any,
# else the last lines; cargo's progress lines left out.
why() {
  [ -s "$1" ] || { echo "    (no output in $(basename "$1"))"; return; }
  local log errs
  log=$(grep -v -E '^\s*(Compiling|Finished|Running|Blocking|Updating|Downloading|Downloaded|Locking|Executable) ' "$1")
  errs=$(grep -E -A8 -m3 '^(error|Error)|panicked' <<<"$log" | head -"${2:-25}")
  { [ -n "$errs" ] && echo "$errs" || tail -"${2:-15}" <<<"$log"; } | sed 's/^/    /'
}

# The value before the first word ending in "/s" of a result line (its ops/s).
rate_of() { awk '{for (i = 2; i <= NF; i++) if ($i ~ /\/s$/) { print $(i - 1); exit }}' <<<"$1"; }

# limit-server and reserve-load, built from the working tree; if the tree does not build (the
# shelfsync-tests crate links the hub, which may be mid-change), from a clean checkout of HEAD.
echo "== building limit-server and reserve-load (release)"
LIMIT_BIN=""; LOAD_BIN=""
if cargo build --release -q -p shelfsync-tests --bin limit-server --bin reserve-load >"$work/build.log" 2>&1; then
  LIMIT_BIN=$PWD/target/release/limit-server; LOAD_BIN=$PWD/target/release/reserve-load
else
  echo "the working tree does not build; why:"; why "$work/build.log"
  echo "building them from HEAD ($(git rev-parse --short HEAD)) in a scratch worktree instead"
  head_tree=$work/head
  if git worktree add -q --detach "$head_tree" HEAD >"$work/worktree.log" 2>&1 &&
     CARGO_TARGET_DIR=$PWD/target cargo build --release -q --manifest-path "$head_tree/Cargo.toml" \
       -p shelfsync-tests --bin limit-server --bin reserve-load >"$work/build-head.log" 2>&1; then
    # (the same target directory: the dependencies are reused, only the workspace's crates build)
    LIMIT_BIN=$PWD/target/release/limit-server; LOAD_BIN=$PWD/target/release/reserve-load
  else
    echo "HEAD does not build either; why:"; why "$work/worktree.log"; why "$work/build-head.log"
  fi
fi

echo "== shelfsync-hub"
SHELFSYNC_BENCH_CLIENTS=$CLIENTS cargo bench -q -p shelfsync-tests --bench reservations >"$work/hub.out" 2>"$work/hub.err"
hub_line=$(grep '^shelfsync-hub ' "$work/hub.out")
if [ -n "$hub_line" ]; then
  echo "$hub_line"
else
  echo "shelfsync-hub: the benchmark failed to build or run; why:"; why "$work/hub.err"; [ -s "$work/hub.out" ] && why "$work/hub.out" 5
fi

# A port nobody listens on (the distribution's own cluster may hold 5432, an earlier run 55432).
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 40000))
    # Nothing answers a connect there (bash's /dev/tcp; no python or ss needed on a fresh machine).
    (: </dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return; }
  done
  echo "no free port found on 127.0.0.1" >&2
  return 1
}

echo "== PostgreSQL"
PGPORT=$(free_port)
if ! command -v pgbench >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get install -y -qq postgresql >/dev/null 2>&1 || true
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$PGBIN" ] || ! command -v pgbench >/dev/null; then
  echo "PostgreSQL: not available on this machine (apt-get install postgresql failed); skipped"
  PGBIN=""
else
  mkdir -p "$work/pg" && chown postgres "$work" "$work/pg"
  # The server runs as postgres, which may not read the checkout: run from the scratch dir.
  if (cd "$work" && runuser -u postgres -- "$PGBIN/initdb" -D "$work/pg" -A trust >"$work/initdb.log" 2>&1) &&
     (cd "$work" && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -t 60 \
       -o "-c listen_addresses=127.0.0.1 -c port=$PGPORT -c unix_socket_directories=$work -c max_connections=200 -c fsync=on -c synchronous_commit=on" \
       start -w >"$work/pg_ctl.log" 2>&1); then
    psql -h 127.0.0.1 -p "$PGPORT" -U postgres -q -c "CREATE TABLE stock (sku text PRIMARY KEY, qty bigint NOT NULL); INSERT INTO stock VALUES ('HOT', 1000000000);" postgres
    echo "UPDATE stock SET qty = qty - 1 WHERE sku = 'HOT' AND qty >= 1;" > "$work/reserve.sql"
    out=$(pgbench -h 127.0.0.1 -p "$PGPORT" -U postgres -n -c "$CLIENTS" -j 2 -T "$SECS" -f "$work/reserve.sql" -l --log-prefix="$work/pgb" postgres 2>&1)
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    # per-transaction logs: column 3 is the latency in microseconds
    read -r p50 p99 < <(cat "$work"/pgb* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f %.2f\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
    if [ -n "$tps" ]; then
      pg_line=$(printf "postgresql     %s clients  %8.0f updates/s       p50 %6s ms  p99 %6s ms  (one row, fsync per commit)" "$CLIENTS" "$tps" "$p50" "$p99")
      echo "$pg_line"
    else
      echo "PostgreSQL: pgbench failed; why:"; echo "$out" | tail -5 | sed 's/^/    /'
    fi
  else
    echo "PostgreSQL: could not start a server on loopback; skipped. Why:"
    for f in initdb.log pg_ctl.log pg.log; do [ -s "$work/$f" ] && { echo "-- $f"; tail -15 "$work/$f"; }; done
    PGBIN=""
  fi
fi

echo "== Redis"
REDISPORT=$(free_port)
if ! command -v redis-server >/dev/null; then
  apt-get install -y -qq redis-server >/dev/null 2>&1 || true
fi
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "Redis: not available on this machine (apt-get install redis-server failed); skipped"
else
  redis-server --port "$REDISPORT" --bind 127.0.0.1 --dir "$work" --appendonly yes --appendfsync always --save "" --daemonize no >/dev/null 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do redis-cli -p "$REDISPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDISPORT" set stock:HOT 1000000000 >/dev/null
  script='local q = tonumber(redis.call("GET", KEYS[1])) if q and q >= 1 then return redis.call("DECR", KEYS[1]) else return -1 end'
  out=$(redis-benchmark -p "$REDISPORT" -c "$CLIENTS" -n $((CLIENTS * 2000)) -q --csv EVAL "$script" 1 stock:HOT 2>&1)
  # CSV: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  line=$(echo "$out" | grep -i '^"EVAL' | head -1)
  if [ -n "$line" ]; then
    # The test name holds the script (with commas): count fields from the end.
    read -r rps p50 p99 < <(echo "$line" | awk -F'","' '{gsub(/"/, "", $NF); print $(NF-6), $(NF-3), $(NF-1)}')
    redis_line=$(printf "redis          %s clients  %8.0f decrements/s    p50 %6s ms  p99 %6s ms  (Lua check-and-decrement, appendfsync always)" "$CLIENTS" "$rps" "$p50" "$p99")
    echo "$redis_line"
  else
    echo "Redis: benchmark output not understood:"; echo "$out" | tail -3
  fi
fi

echo "== limit (limit-server: this machine's limit for the hub's shape of work)"
if [ -z "$LIMIT_BIN" ]; then
  echo "limit: not built (see above); skipped"
else
  limit_token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  # A coprocess: its stdin is a pipe from this script, so it also stops when this script ends.
  coproc LIMIT { SHELFSYNC_LIMIT_TOKEN=$limit_token exec "$LIMIT_BIN" --db "$work/limit.db" --stock HOT=1000000000 2>"$work/limit.err"; }
  limit_pid=$LIMIT_PID
  limit_url=""
  # (bash unsets LIMIT once the coprocess has exited: a server that died at once leaves it empty)
  limit_out=${LIMIT[0]:-}
  [ -n "$limit_out" ] && read -r -t 30 -u "$limit_out" limit_url
  if [ -z "$limit_url" ]; then
    echo "limit: limit-server did not start; why:"; why "$work/limit.err"
  else
    SHELFSYNC_BENCH_TOKEN=$limit_token SHELFSYNC_BENCH_CLIENTS=$CLIENTS "$LOAD_BIN" "$limit_url" limit \
      "axum + JSON + token, one decider thread, SQLite WAL FULL group commit" >"$work/limit.out" 2>"$work/limit-load.err"
    limit_line=$(grep '^limit ' "$work/limit.out")
    if [ -n "$limit_line" ]; then
      echo "$limit_line"
    else
      echo "limit: the load run failed; why:"; why "$work/limit-load.err"; [ -s "$work/limit.err" ] && why "$work/limit.err" 5
    fi
  fi
  kill "$limit_pid" 2>/dev/null
  wait "$limit_pid" 2>/dev/null
  limit_pid=""
fi

echo
echo "== $CLIENTS clients, one hot SKU, every system durable"
printf "%s\n" "${hub_line:-shelfsync-hub  (failed, see above)}" "${pg_line:-postgresql     (skipped or failed, see above)}" \
  "${redis_line:-redis          (skipped or failed, see above)}" "${limit_line:-limit          (failed, see above)}"
hub_rate=$(rate_of "${hub_line:-}"); limit_rate=$(rate_of "${limit_line:-}"); pg_rate=$(rate_of "${pg_line:-}")
if [ -n "$hub_rate" ] && [ -n "$limit_rate" ]; then
  awk -v h="$hub_rate" -v l="$limit_rate" 'BEGIN { printf "hub / limit       %6.1f %%  (target >= 60 %%)%s\n", 100 * h / l, (h >= 0.6 * l ? "" : "  below target") }'
else
  echo "hub / limit       n/a (a line is missing)"
fi
if [ -n "$hub_rate" ] && [ -n "$pg_rate" ]; then
  awk -v h="$hub_rate" -v p="$pg_rate" 'BEGIN { printf "hub / postgresql  %6.1f x  (target >= 10 x)%s\n", h / p, (h >= 10 * p ? "" : "  below target") }'
else
  echo "hub / postgresql  n/a (a line is missing)"
fi
