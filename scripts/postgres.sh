#!/usr/bin/env bash
# A throwaway PostgreSQL cluster inside the checkout (.pg/, git-ignored) for the storage
# tests and for trying deploy/dagster.yaml and the MLflow Postgres backend store locally.
#
#   scripts/postgres.sh start    install Debian's postgresql if no server binaries exist
#                                under /usr/lib/postgresql/*/bin, initdb .pg/data once,
#                                start it on 127.0.0.1 (a free port, kept in .pg/port),
#                                create the databases `dagster` and `mlflow`, print the
#                                connection settings (KEY=VALUE lines on stdout)
#   scripts/postgres.sh env      print the connection settings of the running cluster
#   scripts/postgres.sh status   exit 0 when the cluster runs, 1 when it does not
#   scripts/postgres.sh stop     stop it (the data stays in .pg/data; rm -rf .pg drops it)
#
# Idempotent: `start` on a running cluster only prints its settings. The superuser is
# `recapflow` with a random password generated at initdb (.pg/password, mode 600); the
# server listens on 127.0.0.1 only, with no Unix socket, and password (scram) auth.
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user
# (created by Debian's package) through runuser (or su).
#
# Settings: RECAPFLOW_PG_DIR (default <repo>/.pg; as root, /var/tmp/recapflow-pg-<hash>
# when the `postgres` user cannot reach the checkout), RECAPFLOW_PG_PORT (default: the port
# of the last start if free, else the first free one from 54329).
# Exit status 77 (the conventional "skip"): apt is unavailable and no server is installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_DIR="${RECAPFLOW_PG_DIR:-$REPO/.pg}"
set_paths() {
    DATA="$PG_DIR/data"
    LOG="$PG_DIR/postgres.log"
    PORT_FILE="$PG_DIR/port"
    PW_FILE="$PG_DIR/password"
}
set_paths
PG_SUPERUSER=recapflow
DATABASES=(dagster mlflow)
FIRST_PORT=54329
EXIT_APT_UNAVAILABLE=77

log() { echo "postgres.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# The newest installed server, or the one matching an existing cluster's version.
find_bindir() {
    local d
    if [[ -s "$DATA/PG_VERSION" ]]; then
        d="/usr/lib/postgresql/$(cat "$DATA/PG_VERSION")/bin"
        if [[ -x "$d/postgres" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    fi
    while IFS= read -r d; do
        if [[ -x "$d/postgres" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    return 1
}

install_postgres() {
    local sudo=()
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt unavailable: no PostgreSQL server under /usr/lib/postgresql/*/bin and no apt-get" \
            "to install Debian's postgresql"
        exit "$EXIT_APT_UNAVAILABLE"
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            log "apt unavailable: installing postgresql needs root or passwordless sudo"
            exit "$EXIT_APT_UNAVAILABLE"
        fi
    fi
    log "installing Debian's postgresql with apt-get"
    # Debian's package would create and start a `main` cluster on port 5432: not needed.
    "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" |
        "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/recapflow.conf >/dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
        die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends postgresql >&2 ||
        die "apt-get install postgresql failed"
}

# Commands touching the data folder run as the cluster's owner.
if [[ "$(id -u)" -eq 0 ]]; then
    PG_OS_USER=postgres
    as_owner() {
        if command -v runuser >/dev/null 2>&1; then
            runuser -u "$PG_OS_USER" -- "$@"
        else
            su -s /bin/sh "$PG_OS_USER" -c "$(printf '%q ' "$@")"
        fi
    }
else
    PG_OS_USER="$(id -un)"
    as_owner() { "$@"; }
fi

# As root the server runs as `postgres`, which must reach the folder. A checkout it
# cannot reach (under a private home such as /root) gets its cluster in /var/tmp instead.
choose_pg_dir() {
    if [[ -n "${RECAPFLOW_PG_DIR:-}" || "$(id -u)" -ne 0 ]] || ! id "$PG_OS_USER" >/dev/null 2>&1; then
        return 0
    fi
    if ! as_owner test -x "$REPO"; then
        PG_DIR="/var/tmp/recapflow-pg-$(printf '%s' "$REPO" | md5sum | cut -c1-12)"
        set_paths
        log "user '$PG_OS_USER' cannot reach $REPO: the cluster lives in $PG_DIR"
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {
    local p
    if [[ -n "${RECAPFLOW_PG_PORT:-}" ]]; then
        port_in_use "$RECAPFLOW_PG_PORT" && die "port $RECAPFLOW_PG_PORT (RECAPFLOW_PG_PORT) is in use"
        echo "$RECAPFLOW_PG_PORT"
        return 0
    fi
    if [[ -s "$PORT_FILE" ]] && ! port_in_use "$(cat "$PORT_FILE")"; then
        cat "$PORT_FILE"
        return 0
    fi
    for ((p = FIRST_PORT; p < FIRST_PORT + 200; p++)); do
        if ! port_in_use "$p"; then
            echo "$p"
            return 0
        fi
    done
    die "no free port in $FIRST_PORT-$((FIRST_PORT + 199))"
}

is_running() {
    [[ -s "$DATA/PG_VERSION" ]] || return 1
    local bindir
    bindir="$(find_bindir)" || return 1
    as_owner "$bindir/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

init_cluster() {
    local bindir="$1"
    mkdir -p "$PG_DIR"
    if [[ "$(id -u)" -eq 0 ]]; then
        id "$PG_OS_USER" >/dev/null 2>&1 ||
            die "running as root needs the '$PG_OS_USER' user (Debian's postgresql package creates it)"
        chown "$PG_OS_USER:" "$PG_DIR"
    fi
    chmod 700 "$PG_DIR"
    as_owner test -w "$PG_DIR" ||
        die "user '$PG_OS_USER' cannot write $PG_DIR (is every parent folder traversable?);" \
            "set RECAPFLOW_PG_DIR to a folder it can reach"
    if [[ ! -s "$PW_FILE" ]]; then
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$PW_FILE")
        if [[ "$(id -u)" -eq 0 ]]; then chown "$PG_OS_USER:" "$PW_FILE"; fi
    fi
    log "initdb $DATA ($("$bindir/postgres" --version))"
    as_owner "$bindir/initdb" -D "$DATA" -U "$PG_SUPERUSER" --pwfile="$PW_FILE" \
        --auth=scram-sha-256 -E UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1 ||
        die "initdb failed; see $PG_DIR/initdb.log"
    as_owner sh -c "cat >> '$DATA/postgresql.conf'" <<'EOF'

# recapflow (scripts/postgres.sh): loopback TCP only, no Unix socket; the port is given
# at start (pg_ctl -o "-p PORT").
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
EOF
}

psql_() {
    PGPASSWORD="$(cat "$PW_FILE")" "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PORT" -U "$PG_SUPERUSER" "$@"
}

create_databases() {
    local db
    for db in "${DATABASES[@]}"; do
        if [[ "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
            psql_ -d postgres -c "CREATE DATABASE $db" >/dev/null
            log "created database $db"
        fi
    done
}

print_env() {
    local pw url
    pw="$(cat "$PW_FILE")"
    url="postgresql://$PG_SUPERUSER:$pw@127.0.0.1:$PORT"
    cat <<EOF
RECAPFLOW_PG_HOST=127.0.0.1
RECAPFLOW_PG_PORT=$PORT
RECAPFLOW_PG_USER=$PG_SUPERUSER
RECAPFLOW_PG_PASSWORD=$pw
RECAPFLOW_PG_URL=$url
DAGSTER_PG_HOST=127.0.0.1
DAGSTER_PG_PORT=$PORT
DAGSTER_PG_USERNAME=$PG_SUPERUSER
DAGSTER_PG_PASSWORD=$pw
DAGSTER_PG_DB=dagster
MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://$PG_SUPERUSER:$pw@127.0.0.1:$PORT/mlflow
EOF
}

cmd_start() {
    if ! find_bindir >/dev/null; then
        install_postgres
    fi
    choose_pg_dir
    BINDIR="$(find_bindir)" || die "postgresql installed, but no server under /usr/lib/postgresql/*/bin"
    [[ -s "$DATA/PG_VERSION" ]] || init_cluster "$BINDIR"
    if is_running; then
        PORT="$(cat "$PORT_FILE")"
        log "already running on 127.0.0.1:$PORT"
    else
        PORT="$(pick_port)"
        echo "$PORT" >"$PORT_FILE"
        as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PORT" start >/dev/null ||
            die "pg_ctl start failed; see $LOG"
        log "started $("$BINDIR/postgres" --version) on 127.0.0.1:$PORT (data $DATA, log $LOG)"
    fi
    create_databases
    print_env
}

cmd_env() {
    is_running || die "not running; run: $0 start"
    BINDIR="$(find_bindir)"
    PORT="$(cat "$PORT_FILE")"
    print_env
}

cmd_stop() {
    if is_running; then
        BINDIR="$(find_bindir)"
        as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
        log "stopped"
    else
        log "not running"
    fi
}

[[ "${1:-}" == start ]] || choose_pg_dir
case "${1:-}" in
start) cmd_start ;;
env) cmd_env ;;
status)
    if is_running; then
        log "running on 127.0.0.1:$(cat "$PORT_FILE")"
    else
        log "not running"
        exit 1
    fi
    ;;
stop) cmd_stop ;;
*)
    echo "usage: $0 start|env|status|stop" >&2
    exit 2
    ;;
esac
