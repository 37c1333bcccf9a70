-- How many upstream attempts (retries, failover) each request took.
ALTER TABLE usage_events ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
