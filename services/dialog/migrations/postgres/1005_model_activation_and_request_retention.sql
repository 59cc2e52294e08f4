-- At most one active model version per tenant. Concurrent activations could leave several
-- active before this index existed: of those, the row written last (the most recent
-- activation, by the age of its writing transaction) stays active, the version number breaking
-- ties; the others become inactive.

UPDATE dialog_models SET active = FALSE
    WHERE active AND (tenant, id) NOT IN (
        SELECT DISTINCT ON (tenant) tenant, id FROM dialog_models WHERE active
            ORDER BY tenant, age(xmin), version DESC);
CREATE UNIQUE INDEX dialog_models_one_active ON dialog_models (tenant) WHERE active;

-- The creation time of each request record (the response kept for idempotent retries), so
-- records older than the retention are deleted. Records stored before this migration count as
-- created at the time it runs; the default after it is the time of the insert.

ALTER TABLE dialog_requests ADD COLUMN created_micros BIGINT NOT NULL
    DEFAULT CAST(EXTRACT(EPOCH FROM now()) * 1000000 AS BIGINT);
ALTER TABLE dialog_requests ALTER COLUMN created_micros
    SET DEFAULT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT);
CREATE INDEX dialog_requests_created ON dialog_requests (created_micros);
