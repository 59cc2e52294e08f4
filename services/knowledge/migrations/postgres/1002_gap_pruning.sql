-- Gaps not seen for 90 days are deleted hourly, across tenants, by when they were last seen.
CREATE INDEX knowledge_gaps_last_seen ON knowledge_gaps (last_seen);
