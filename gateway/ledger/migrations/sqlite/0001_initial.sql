-- Same tables as the PostgreSQL schema, in SQLite's types. Times are ISO 8601 UTC text.
CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    key_sha256  TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    team_id     TEXT,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE usage_events (
    request_id              TEXT PRIMARY KEY,
    created_at              TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    user_id                 TEXT NOT NULL,
    team_id                 TEXT,
    route                   TEXT NOT NULL,
    model                   TEXT NOT NULL,
    provider                TEXT NOT NULL,
    upstream_model          TEXT NOT NULL,
    stream                  INTEGER NOT NULL,
    status                  INTEGER NOT NULL,
    error_code              TEXT,
    prompt_tokens_estimated INTEGER NOT NULL,
    prompt_estimate_exact   INTEGER NOT NULL,
    reserved_tokens         INTEGER NOT NULL,
    prompt_tokens           INTEGER,
    completion_tokens       INTEGER,
    usage_source            TEXT NOT NULL,
    latency_ms              REAL NOT NULL,
    upstream_latency_ms     REAL,
    client_request_id       TEXT
);

CREATE INDEX usage_events_created_at_idx ON usage_events (created_at);
CREATE INDEX usage_events_user_created_at_idx ON usage_events (user_id, created_at);
CREATE INDEX usage_events_team_created_at_idx ON usage_events (team_id, created_at);
