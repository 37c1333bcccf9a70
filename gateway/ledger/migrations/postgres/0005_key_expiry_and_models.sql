-- Keys can expire (rotation gives the old key a grace period) and be limited to models.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN models text[] NOT NULL DEFAULT '{}';
