-- Runs once, when the development PostgreSQL initialises its volume (docker-entrypoint-initdb.d;
-- also used by deploy/compose.yaml). One database per service, each service in its own schema
-- inside it: the outbox relay's election uses a PostgreSQL advisory lock whose key is the same
-- for every service, and advisory locks are per database, so services sharing one database
-- would elect a single relay among all of them (docs/operations.md, "PostgreSQL").
CREATE DATABASE tandem_dialog;
CREATE DATABASE tandem_routing;
CREATE DATABASE tandem_knowledge;
CREATE DATABASE tandem_feedback;
CREATE DATABASE tandem_policy;
