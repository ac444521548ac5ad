#!/usr/bin/env bash
# Hot-SKU reservations/s and latency, 64 clients, on this machine in one run:
#   1. shelfsync-hub (cargo bench --bench reservations)
#   2. PostgreSQL: UPDATE stock SET qty = qty - 1 WHERE sku = $1 AND qty >= 1 (pgbench)
#   3. Redis: a check-and-decrement Lua script (redis-benchmark), appendfsync always
# All durable (fsync per commit or group commit), all on loopback. PostgreSQL and Redis come from
# Debian's packages; if one cannot be installed or started, this says so and goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-64}
SECS=${SECS:-10}
work=$(mktemp -d /tmp/shelfsync-bench.XXXXXX)
cleanup() {
  [ -n "${PGBIN:-}" ] && (cd / && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1)
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== shelfsync-hub"
SHELFSYNC_BENCH_CLIENTS=$CLIENTS cargo bench -q -p shelfsync-tests --bench reservations 2>/dev/null | grep shelfsync-hub \
  || echo "shelfsync-hub: benchmark failed"

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
    printf "postgresql     %s clients  %8.0f updates/s       p50 %6s ms  p99 %6s ms  (one row, fsync per commit)\n" "$CLIENTS" "$tps" "$p50" "$p99"
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
    printf "redis          %s clients  %8.0f decrements/s    p50 %6s ms  p99 %6s ms  (Lua check-and-decrement, appendfsync always)\n" "$CLIENTS" "$rps" "$p50" "$p99"
  else
    echo "Redis: benchmark output not understood:"; echo "$out" | tail -3
  fi
fi
