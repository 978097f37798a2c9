#!/usr/bin/env bash
# Creates the compose stack's generated secrets in /secrets (the bind-mounted
# CONCIERGE_SECRETS_DIR): the PostgreSQL superuser password, one database URL per service
# (each with its own role and password), the Redis URL and Grafana's admin password.
#
# Run by the `setup-secrets` service of the `setup` profile (see docker-compose.yml), as
# root inside the PostgreSQL image because the Concierge images have no shell. It makes
# the directory and every file in it belong to 65532:65532 (the user every container of
# the stack runs as) with modes 0700 / 0600, since compose mounts file secrets as they are
# on the host. It never overwrites a file and never prints a secret: run it again and it
# only fixes ownership and fills in what is missing.
set -Eeuo pipefail

dir=/secrets
owner=65532:65532

umask 077
chown "$owner" "$dir"
chmod 0700 "$dir"

# 32 random bytes as 64 hex digits: safe in a URL without any encoding.
random_hex() {
    head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \n'
}

# write NAME VALUE: creates $dir/NAME unless it exists.
write() {
    local path="$dir/$1"
    if [[ -e $path ]]; then
        echo "kept     $path"
    else
        printf '%s\n' "$2" >"$path"
        echo "created  $path"
    fi
}

write postgres-password "$(random_hex)"
# The role and the database of each service are created from these URLs by
# deploy/postgres/init-databases.sh on PostgreSQL's first start.
write vault-database-url "postgres://credential_vault:$(random_hex)@postgres:5432/credential_vault"
write registry-database-url "postgres://service_registry:$(random_hex)@postgres:5432/service_registry"
write monitor-database-url "postgres://health_monitor:$(random_hex)@postgres:5432/health_monitor"
# Redis takes its password from this URL too (see the redis service).
write redis-url "redis://:$(random_hex)@redis:6379"
write grafana-admin-password "$(random_hex)"

# Files written earlier, by hand or by `credential-vault`, get the same owner and mode.
find "$dir" -maxdepth 1 -type f -exec chown "$owner" {} + -exec chmod 0600 {} +

echo
echo "Next: the master key and the vault's tokens (see deploy/compose/README.md):"
echo "  docker compose --profile setup run --rm vault-master-key"
echo "  docker compose --profile setup run --rm vault-init"
