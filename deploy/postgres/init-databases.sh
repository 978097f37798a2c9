#!/usr/bin/env bash
# One database per service, each owned by a role of its own: no service can read another's
# tables (DESIGN.md). Run by the PostgreSQL image's entrypoint on the first start of an
# empty data directory (mounted into /docker-entrypoint-initdb.d/), as the database user.
#
# Each service's role, password and database come from that service's own DATABASE_URL
# secret, so there is one source of truth and nothing to keep in step:
#   /run/secrets/vault-database-url      postgres://credential_vault:PASSWORD@postgres:5432/credential_vault
#   /run/secrets/registry-database-url   postgres://service_registry:PASSWORD@postgres:5432/service_registry
#   /run/secrets/monitor-database-url    postgres://health_monitor:PASSWORD@postgres:5432/health_monitor
# (`docker compose --profile setup run --rm setup-secrets` writes them.) Percent-encoded
# user names and passwords are decoded. No value is ever printed.
#
# The script only runs on an empty data directory: to change a password later, ALTER ROLE
# by hand and update the URL secret.
#
# Executable, so that the entrypoint runs it in a shell of its own rather than sourcing it.
set -Eeuo pipefail

percent_decode() {
    printf '%b' "${1//%/\\x}"
}

create_service_database() {
    local file=$1 url
    url=$(<"$file")
    url=${url%$'\n'}
    local pattern='^postgres(ql)?://([^:@/]+):([^@/]+)@[^/]+/([^?/]+)(\?.*)?$'
    if [[ ! $url =~ $pattern ]]; then
        echo "init-databases: $file is not postgres://USER:PASSWORD@HOST[:PORT]/DATABASE" >&2
        return 1
    fi
    local role password database
    role=$(percent_decode "${BASH_REMATCH[2]}")
    password=$(percent_decode "${BASH_REMATCH[3]}")
    database=$(percent_decode "${BASH_REMATCH[4]}")
    echo "init-databases: role and database \"$database\" (owner \"$role\")"
    # psql's :"x" and :'x' quote the values as an identifier and as a literal.
    psql --no-psqlrc --quiet --set=ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        --set=role="$role" --set=password="$password" --set=database="$database" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"database" OWNER :"role";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
SQL
}

for service in vault registry monitor; do
    create_service_database "/run/secrets/$service-database-url"
done
