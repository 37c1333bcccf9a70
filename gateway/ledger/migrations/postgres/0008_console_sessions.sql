-- Sessions of the operators' web console (/ui/). Only the SHA-256 of each session id is
-- kept, never the id itself: a copy of this table signs nobody in.
CREATE TABLE console_sessions (
    session_sha256 text PRIMARY KEY,
    created_at     timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL
);
CREATE INDEX console_sessions_last_seen_at_idx ON console_sessions (last_seen_at);
