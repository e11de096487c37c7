#!/bin/sh
# The official postgres image's contract, in short: on first start (no $PGDATA/PG_VERSION) initialise the
# cluster with POSTGRES_USER as superuser (password POSTGRES_PASSWORD, scram-sha-256 over TCP from anywhere,
# trust over the local socket only), create POSTGRES_DB, then run the command (postgres) in the foreground.
set -eu
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
export PGDATA

# The in-progress mark sits beside PGDATA and goes last: a first start that failed half-way (killed, no socket
# directory) starts over instead of leaving a cluster without its database. An existing cluster is never wiped.
INITIALISING="$PGDATA.initialising"
if [ "${1:-postgres}" = postgres ] && { [ ! -s "$PGDATA/PG_VERSION" ] || [ -e "$INITIALISING" ]; }; then
  mkdir -p "$PGDATA"
  touch "$INITIALISING"
  chmod 0700 "$PGDATA"
  find "$PGDATA" -mindepth 1 -delete
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl --wait --silent -o "-c listen_addresses=''" start
  if [ "$POSTGRES_DB" != postgres ]; then
    createdb --username="$POSTGRES_USER" "$POSTGRES_DB"
  fi
  pg_ctl --wait --silent -m fast stop
  rm -f "$INITIALISING"
  echo "postgres-entrypoint: initialised $PGDATA (database $POSTGRES_DB)"
fi

if [ "${1:-postgres}" = postgres ]; then
  shift || true
  exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
