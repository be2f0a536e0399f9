#!/usr/bin/env bash
# cluster-dev.sh: `make cluster`. A PostgreSQL and three keyissuerd on the
# development token, in the foreground; Ctrl-C stops everything cleanly.
#
#   PostgreSQL  127.0.0.1:55432, data in .pgdata/, run as an unprivileged
#               user (postgres when we are root: PostgreSQL refuses root),
#               role and database keyissuer, its password in
#               run/cluster/pg.password
#   instance N  (1, 2, 3): applyPublicKey on 127.0.0.1:808N, admin on
#               127.0.0.1:947N, decrypt socket run/cluster/N/decrypt.sock,
#               config run/cluster/N/config.toml: config.example.toml with
#               token storage, the postgres backend and those addresses
#
# Installs postgresql with apt-get if it is missing and we are root.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
port=${PGPORT_CLUSTER:-55432}
pgdata=$root/.pgdata
run=$root/run/cluster

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z $pgbin ]]; then
	if [[ $(id -u) -ne 0 ]]; then
		echo "PostgreSQL is not installed. Install it with:" >&2
		echo "  sudo apt-get install postgresql" >&2
		exit 1
	fi
	echo "Installing postgresql..."
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends postgresql >/dev/null
	pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# as_pg runs a PostgreSQL program as the user that owns the data.
as_pg=()
if [[ $(id -u) -eq 0 ]]; then
	id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
	as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
	if ! "${as_pg[@]}" test -x "$root"; then
		echo "the postgres user cannot reach $root (a parent directory is closed to it)" >&2
		exit 1
	fi
fi

mkdir -p "$run"
if [[ ! -s $pgdata/PG_VERSION ]]; then
	echo "Creating the cluster's PostgreSQL in $pgdata..."
	mkdir -p "$pgdata"
	chmod 700 "$pgdata"
	umask 077
	head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$run/pg.password"
	pwfile=$(mktemp)
	cp "$run/pg.password" "$pwfile"
	if ((${#as_pg[@]})); then
		chown postgres: "$pgdata" "$pwfile"
	fi
	"${as_pg[@]}" "$pgbin/initdb" -D "$pgdata" -U keyissuer --pwfile="$pwfile" \
		--auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
	rm -f "$pwfile"
fi
if [[ ! -s $run/pg.password ]]; then
	echo "$run/pg.password is missing: remove .pgdata/ to start the database afresh" >&2
	exit 1
fi
chmod 600 "$run/pg.password"

pids=()
stop() {
	trap - INT TERM EXIT
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null 2>&1 || true
	echo "cluster stopped"
}
trap stop INT TERM EXIT

"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/log" -w \
	-o "-p $port -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null
echo "PostgreSQL on 127.0.0.1:$port (log: .pgdata/log)"
"${as_pg[@]}" "$pgbin/psql" -h "$pgdata" -p "$port" -U keyissuer -d postgres -qtAc \
	"SELECT 1 FROM pg_database WHERE datname = 'keyissuer'" | grep -q 1 ||
	"${as_pg[@]}" "$pgbin/psql" -h "$pgdata" -p "$port" -U keyissuer -d postgres -qc "CREATE DATABASE keyissuer"

export SOFTHSM2_CONF=$root/.softhsm/softhsm2.conf
for n in 1 2 3; do
	dir=$run/$n
	mkdir -p "$dir"
	# config.example.toml, with each change checked to have happened.
	sed -e "s|^pin_file = \".softhsm/user.pin\"|pin_file = \"$root/.softhsm/user.pin\"|" \
		-e 's|^storage = "session"|storage = "token"|' \
		-e 's|^backend = "bolt"|backend = "postgres"|' \
		-e "s|^# dsn = .*|dsn = \"host=127.0.0.1 port=$port user=keyissuer dbname=keyissuer sslmode=disable\"|" \
		-e "s|^# password_file = .*|password_file = \"$run/pg.password\"|" \
		-e "s|^# instance_id = .*|instance_id = \"keyissuer-$n\"|" \
		-e "s|^listen = \"127.0.0.1:8080\"|listen = \"127.0.0.1:808$n\"|" \
		-e "s|^listen = \"127.0.0.1:9464\"|listen = \"127.0.0.1:947$n\"|" \
		-e "s|^socket = \"run/decrypt.sock\"|socket = \"$dir/decrypt.sock\"|" \
		config.example.toml >"$dir/config.toml"
	for want in "storage = \"token\"" "backend = \"postgres\"" "instance_id = \"keyissuer-$n\"" \
		"listen = \"127.0.0.1:808$n\"" "listen = \"127.0.0.1:947$n\"" "socket = \"$dir/decrypt.sock\"" \
		"password_file = \"$run/pg.password\"" "pin_file = \"$root/.softhsm/user.pin\""; do
		grep -qF "$want" "$dir/config.toml" || { echo "config.example.toml changed: could not set $want" >&2; exit 1; }
	done
	bin/keyissuerd -config "$dir/config.toml" 2> >(sed -u "s/^/[$n] /" >&2) &
	pids+=($!)
done
echo "three instances: apply on http://127.0.0.1:8081, :8082, :8083; decrypt through run/cluster/{1,2,3}/decrypt.sock; Ctrl-C stops"
# Whichever instance stops first, stop the rest.
wait -n "${pids[@]}" || true
