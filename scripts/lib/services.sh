# Redis and PostgreSQL for the tests. Sourced, not run; needs venv.sh first
# (its python does the connection checks, because it is sure to exist).
#
# Each service comes from, in this order:
#   1. REDIS_URL / DATABASE_URL when set;
#   2. the machine's standard local server (127.0.0.1:6379, 127.0.0.1:5432), only when
#      GATEWAY_TEST_LOCAL_SERVICES=1 allows it: a developer's servers hold data of
#      their own (the tests then keep to their own database and key prefix);
#   3. a throwaway server on a free port, in a temp dir, stopped on exit.
# GATEWAY_TEST_THROWAWAY=1 skips 1 and 2, to exercise the fresh-machine path.
# The caller must run `trap cleanup_services EXIT` before ensure_redis/ensure_postgres.

# shellcheck source-path=SCRIPTDIR source=system.sh
. "$(dirname "${BASH_SOURCE[0]}")/system.sh"

_REDIS_TMP=""   # temp dir of our throwaway redis-server, if any
_PG_TMP=""      # temp dir of our throwaway PostgreSQL cluster, if any
_PG_BIN=""      # its bin dir (initdb, pg_ctl)

# Prints URL with any password replaced by ***.
redact_url() {
  sed -E 's#(://[^/@:]*):[^/@]*@#\1:***@#' <<<"$1"
}

# Prints a TCP port on 127.0.0.1 that is free right now. The kernel picks it from
# the ephemeral range, so it is never 6379 or 5432.
free_port() {
  "$VENV_PY" -c '
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
'
}

# wait_for TRIES CMD...: reruns CMD every 0.2 s until it succeeds, TRIES times at most.
wait_for() {
  local tries="$1" i
  shift
  for ((i = 0; i < tries; i++)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

tcp_open() {
  "$VENV_PY" -c '
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
' "$1" "$2" 2>/dev/null
}

# redis_answers URL: succeeds when the server answers PING with +PONG (after AUTH
# when the URL has a password). A plain socket, so redis-cli is not needed.
redis_answers() {
  "$VENV_PY" -c '
import socket, ssl, sys
from urllib.parse import unquote, urlsplit

def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out

url = urlsplit(sys.argv[1])
try:
    if url.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(2)
        sock.connect(url.path)
    else:
        sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=2)
        if url.scheme == "rediss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=url.hostname)
    replies = sock.makefile("rb")
    if url.password is not None:
        user = [unquote(url.username)] if url.username else []
        sock.sendall(command("AUTH", *user, unquote(url.password)))
        if not replies.readline().startswith(b"+OK"):
            sys.exit(1)
    sock.sendall(command("PING"))
    sys.exit(0 if replies.readline().startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
' "$1"
}

# pg_select1 URL: runs `select 1` through asyncpg (a project dependency), else psql.
# Returns 2 when neither is available, so the caller can tell "can't check" apart.
pg_select1() {
  if "$VENV_PY" -c 'import asyncpg' 2>/dev/null; then
    "$VENV_PY" -c '
import asyncio, sys
import asyncpg

async def main() -> int:
    conn = await asyncpg.connect(sys.argv[1], timeout=5)
    try:
        return await conn.fetchval("select 1")
    finally:
        await conn.close()

try:
    sys.exit(0 if asyncio.run(main()) == 1 else 1)
except Exception as exc:
    print(f"postgres: {exc!r}", file=sys.stderr)
    sys.exit(1)
' "$1"
  elif command -v psql >/dev/null 2>&1; then
    [ "$(PGCONNECT_TIMEOUT=5 psql "$1" -XtAqc 'select 1')" = 1 ]
  else
    return 2
  fi
}

# ---------------------------------------------------------------- Redis

ensure_redis() {
  if [ "${GATEWAY_TEST_THROWAWAY:-}" = 1 ]; then
    start_throwaway_redis
    echo "redis: throwaway server at $REDIS_URL (GATEWAY_TEST_THROWAWAY=1)"
  elif [ -n "${REDIS_URL:-}" ]; then
    echo "redis: $(redact_url "$REDIS_URL") (from REDIS_URL)"
  elif [ "${GATEWAY_TEST_LOCAL_SERVICES:-}" != 1 ]; then
    start_throwaway_redis
    echo "redis: throwaway server at $REDIS_URL (GATEWAY_TEST_LOCAL_SERVICES=1 uses 127.0.0.1:6379)"
  elif redis_answers redis://127.0.0.1:6379/0; then
    export REDIS_URL=redis://127.0.0.1:6379/0
    echo "redis: local server at $REDIS_URL (GATEWAY_TEST_LOCAL_SERVICES=1)"
  else
    start_throwaway_redis
    echo "redis: throwaway server at $REDIS_URL (nothing answered on 127.0.0.1:6379)"
  fi
}

start_throwaway_redis() {
  local port attempt
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
  _REDIS_TMP="$(mktemp -d "${TMPDIR:-/tmp}/gateway-redis.XXXXXX")"
  # Another process may grab the free port before redis binds it: try a few.
  for attempt in 1 2 3; do
    port="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --daemonize yes --pidfile "$_REDIS_TMP/redis.pid" --dir "$_REDIS_TMP" \
      --logfile "$_REDIS_TMP/redis.log" || true
    if wait_for 50 redis_answers "redis://127.0.0.1:$port/0"; then
      export REDIS_URL="redis://127.0.0.1:$port/0"
      return 0
    fi
    _kill_pidfile "$_REDIS_TMP/redis.pid"
    echo "redis-server did not answer on port $port (attempt $attempt)" >&2
  done
  echo "error: could not start a throwaway redis-server; its log:" >&2
  cat "$_REDIS_TMP/redis.log" >&2 || true
  return 1
}

stop_throwaway_redis() {
  if [ -z "$_REDIS_TMP" ]; then
    return 0
  fi
  _kill_pidfile "$_REDIS_TMP/redis.pid"
  rm -rf "$_REDIS_TMP"
  _REDIS_TMP=""
}

# Stops the process named in a pid file and waits until it is gone, so that no
# daemon outlives the script (SIGKILL after 10 s).
_kill_pidfile() {
  local pid i
  pid="$(cat "$1" 2>/dev/null || true)"
  rm -f "$1"
  if [ -z "$pid" ] || ! kill "$pid" 2>/dev/null; then
    return 0
  fi
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- PostgreSQL

ensure_postgres() {
  local local_url=postgresql://postgres@127.0.0.1:5432/postgres
  if [ "${GATEWAY_TEST_THROWAWAY:-}" = 1 ]; then
    start_throwaway_postgres
    echo "postgres: throwaway cluster at $DATABASE_URL (GATEWAY_TEST_THROWAWAY=1)"
  elif [ -n "${DATABASE_URL:-}" ]; then
    echo "postgres: $(redact_url "$DATABASE_URL") (from DATABASE_URL)"
  elif [ "${GATEWAY_TEST_LOCAL_SERVICES:-}" != 1 ]; then
    start_throwaway_postgres
    echo "postgres: throwaway cluster at $DATABASE_URL (GATEWAY_TEST_LOCAL_SERVICES=1 uses 127.0.0.1:5432)"
  elif tcp_open 127.0.0.1 5432 && _pg_usable "$local_url"; then
    export DATABASE_URL="$local_url"
    echo "postgres: local server at $DATABASE_URL (GATEWAY_TEST_LOCAL_SERVICES=1)"
  else
    start_throwaway_postgres
    echo "postgres: throwaway cluster at $DATABASE_URL (no usable server on 127.0.0.1:5432)"
  fi
}

# Usable when `select 1` works as postgres; trusted on the open port alone only
# when there is no client to ask with.
_pg_usable() {
  local status=0
  pg_select1 "$1" 2>/dev/null || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 2 ]
}

# Prints the bin dir of the newest installed PostgreSQL that has initdb and pg_ctl.
_find_pg_bin() {
  local dir found=""
  while IFS= read -r dir; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      found="$dir"
    fi
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
  [ -n "$found" ] && echo "$found"
}

# Runs a PostgreSQL command. PostgreSQL refuses to run as root, so root hands it
# to the postgres system user; anyone else runs it as themselves.
_pg_run() {
  if [ "$(id -u)" -ne 0 ]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u postgres -- "$@"
  else
    su -s /bin/bash postgres -c "$(printf '%q ' "$@")"
  fi
}

start_throwaway_postgres() {
  local port attempt url
  if ! _PG_BIN="$(_find_pg_bin)"; then
    apt_install postgresql
    _PG_BIN="$(_find_pg_bin)" || { echo "error: no initdb/pg_ctl after installing postgresql" >&2; return 1; }
  fi
  if [ "$(id -u)" -eq 0 ]; then
    # The Debian package creates this user; a hand-made PostgreSQL may not have.
    if ! id -u postgres >/dev/null 2>&1; then
      useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin postgres
    fi
    # /tmp, not TMPDIR: the postgres user must be able to reach the dir.
    _PG_TMP="$(mktemp -d /tmp/gateway-pg.XXXXXX)"
    chown postgres: "$_PG_TMP"
  else
    _PG_TMP="$(mktemp -d "${TMPDIR:-/tmp}/gateway-pg.XXXXXX")"
  fi
  # The cd: as the postgres user, initdb fails when it cannot read the current dir.
  if ! (cd "$_PG_TMP" && _pg_run "$_PG_BIN/initdb" -D "$_PG_TMP/data" --auth=trust \
      -U postgres -E UTF8 --locale=C --no-sync) >"$_PG_TMP/initdb.log" 2>&1; then
    echo "error: initdb failed:" >&2
    cat "$_PG_TMP/initdb.log" >&2
    return 1
  fi
  # TCP on loopback only, the socket in our temp dir (the system's socket dir may
  # not exist or belong to another cluster), and no durability: it is thrown away.
  cat >>"$_PG_TMP/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$_PG_TMP'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  # Another process may grab the free port first: try a few (the last port line wins).
  for attempt in 1 2 3; do
    port="$(free_port)"
    echo "port = $port" >>"$_PG_TMP/data/postgresql.conf"
    url="postgresql://postgres@127.0.0.1:$port/postgres"
    if (cd "$_PG_TMP" && _pg_run "$_PG_BIN/pg_ctl" -D "$_PG_TMP/data" \
          -l "$_PG_TMP/postgres.log" -w -t 30 start) >/dev/null \
       && wait_for 25 pg_select1 "$url"; then
      export DATABASE_URL="$url"
      return 0
    fi
    _stop_pg_cluster
    echo "postgres did not start on port $port (attempt $attempt)" >&2
  done
  echo "error: could not start a throwaway PostgreSQL; its log:" >&2
  cat "$_PG_TMP/postgres.log" >&2 || true
  return 1
}

_stop_pg_cluster() {
  if [ ! -f "$_PG_TMP/data/postmaster.pid" ]; then
    return 0
  fi
  (cd "$_PG_TMP" && _pg_run "$_PG_BIN/pg_ctl" -D "$_PG_TMP/data" -m fast -w -t 30 stop) \
    >/dev/null 2>&1 \
    || (cd "$_PG_TMP" && _pg_run "$_PG_BIN/pg_ctl" -D "$_PG_TMP/data" -m immediate -w stop) \
    >/dev/null 2>&1 \
    || true
}

stop_throwaway_postgres() {
  if [ -z "$_PG_TMP" ]; then
    return 0
  fi
  _stop_pg_cluster
  rm -rf "$_PG_TMP"
  _PG_TMP=""
}

# ---------------------------------------------------------------- both

# Stops whatever throwaway servers this script started. For `trap ... EXIT`.
cleanup_services() {
  stop_throwaway_postgres || true
  stop_throwaway_redis || true
}

# Prints both URLs and checks that each really answers (for GATEWAY_TEST_ONLY_SERVICES).
check_services() {
  echo "REDIS_URL=$(redact_url "$REDIS_URL")"
  echo "DATABASE_URL=$(redact_url "$DATABASE_URL")"
  if ! redis_answers "$REDIS_URL"; then
    echo "error: Redis did not answer PING" >&2
    return 1
  fi
  echo "redis: PING answered PONG"
  if ! pg_select1 "$DATABASE_URL"; then
    echo "error: 'select 1' failed on PostgreSQL (or no asyncpg/psql to ask with)" >&2
    return 1
  fi
  echo "postgres: select 1 answered 1"
}
