-- The last statistics routing reported of each queue (`QueueStatsReported`): the bot's policy
-- decisions read the queue's ETA and whether it is within business hours from them.

CREATE TABLE dialog_queue_stats (
    tenant TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    measured_micros BIGINT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant, queue_id)
);
