-- The desk session that ended last, resumable by its id until the grace period is over, and a
-- count of session opens and resumes that tells the streams of one session id apart: a stream
-- whose session a newer stream resumed notices it, and its end does not close the session.
ALTER TABLE routing_agents ADD COLUMN last_session_id TEXT;
ALTER TABLE routing_agents ADD COLUMN session_epoch BIGINT NOT NULL DEFAULT 0;
