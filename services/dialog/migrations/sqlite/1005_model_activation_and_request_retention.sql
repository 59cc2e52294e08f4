-- At most one active model version per tenant. Should several be active, the highest version
-- stays active and the others become inactive.

UPDATE dialog_models SET active = FALSE
    WHERE active AND EXISTS (
        SELECT 1 FROM dialog_models newer
            WHERE newer.tenant = dialog_models.tenant AND newer.active
                AND newer.version > dialog_models.version);
CREATE UNIQUE INDEX dialog_models_one_active ON dialog_models (tenant) WHERE active;

-- The creation time of each request record (the response kept for idempotent retries), so
-- records older than the retention are deleted. Records stored before this migration count as
-- created at the time it runs.

ALTER TABLE dialog_requests ADD COLUMN created_micros BIGINT NOT NULL DEFAULT 0;
UPDATE dialog_requests
    SET created_micros = CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER);
CREATE INDEX dialog_requests_created ON dialog_requests (created_micros);
