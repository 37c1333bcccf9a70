-- Usage events partitioned by month; request ids kept unique across partitions in
-- their own table; a daily rollup per key (with its user and team) and model.
ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
ALTER INDEX usage_events_created_at_idx RENAME TO usage_events_unpartitioned_created_at_idx;
ALTER INDEX usage_events_user_created_at_idx RENAME TO usage_events_unpartitioned_user_idx;
ALTER INDEX usage_events_team_created_at_idx RENAME TO usage_events_unpartitioned_team_idx;
ALTER INDEX usage_events_key_created_at_idx RENAME TO usage_events_unpartitioned_key_idx;

CREATE TABLE usage_events (LIKE usage_events_unpartitioned INCLUDING DEFAULTS)
    PARTITION BY RANGE (created_at);
ALTER TABLE usage_events ADD PRIMARY KEY (request_id, created_at);
CREATE INDEX usage_events_created_at_idx ON usage_events (created_at);
CREATE INDEX usage_events_user_created_at_idx ON usage_events (user_id, created_at);
CREATE INDEX usage_events_team_created_at_idx ON usage_events (team_id, created_at);
CREATE INDEX usage_events_key_created_at_idx ON usage_events (key_id, created_at);
-- Rows of a month without its partition yet land here instead of failing.
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;

CREATE TABLE usage_request_ids (
    request_id text PRIMARY KEY,
    created_at timestamptz NOT NULL
);

CREATE TABLE usage_daily (
    day               date NOT NULL,
    key_id            text NOT NULL,
    user_id           text NOT NULL,
    team_id           text NOT NULL DEFAULT '',
    model             text NOT NULL,
    requests          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_usd          double precision NOT NULL,
    PRIMARY KEY (day, key_id, user_id, team_id, model)
);
CREATE INDEX usage_daily_user_day_idx ON usage_daily (user_id, day);
CREATE INDEX usage_daily_team_day_idx ON usage_daily (team_id, day);
CREATE INDEX usage_daily_model_day_idx ON usage_daily (model, day);

INSERT INTO usage_events SELECT * FROM usage_events_unpartitioned;
INSERT INTO usage_request_ids SELECT request_id, created_at FROM usage_events_unpartitioned;
INSERT INTO usage_daily
SELECT (created_at AT TIME ZONE 'UTC')::date, key_id, user_id, coalesce(team_id, ''), model, count(*),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0)
FROM usage_events_unpartitioned
GROUP BY 1, 2, 3, 4, 5;
DROP TABLE usage_events_unpartitioned;
