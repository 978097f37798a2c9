-- One database per service: no service reads another's tables.
CREATE DATABASE credential_vault;
CREATE DATABASE service_registry;
CREATE DATABASE health_monitor;
