-- Keys (hashes only) and one usage row per request.
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    key_sha256  char(64) NOT NULL UNIQUE,
    user_id     text NOT NULL,
    team_id     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE usage_events (
    request_id              text PRIMARY KEY,
    created_at              timestamptz NOT NULL,
    key_id                  text NOT NULL,
    user_id                 text NOT NULL,
    team_id                 text,
    route                   text NOT NULL,
    model                   text NOT NULL,
    provider                text NOT NULL,
    upstream_model          text NOT NULL,
    stream                  boolean NOT NULL,
    status                  smallint NOT NULL,
    error_code              text,
    prompt_tokens_estimated integer NOT NULL,
    prompt_estimate_exact   boolean NOT NULL,
    reserved_tokens         integer NOT NULL,
    prompt_tokens           integer,
    completion_tokens       integer,
    usage_source            text NOT NULL,
    latency_ms              double precision NOT NULL,
    upstream_latency_ms     double precision,
    client_request_id       text
);

CREATE INDEX usage_events_created_at_idx ON usage_events (created_at);
CREATE INDEX usage_events_user_created_at_idx ON usage_events (user_id, created_at);
CREATE INDEX usage_events_team_created_at_idx ON usage_events (team_id, created_at);
