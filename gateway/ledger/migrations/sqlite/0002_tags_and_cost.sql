-- Keys carry tags (a JSON array), usage rows carry their cost.
ALTER TABLE api_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
ALTER TABLE usage_events ADD COLUMN cost_usd REAL;
CREATE INDEX usage_events_key_created_at_idx ON usage_events (key_id, created_at);
