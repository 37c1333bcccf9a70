-- SQLite has no partitions. The daily rollup per key (with its user and team) and model.
CREATE TABLE usage_daily (
    day               TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    team_id           TEXT NOT NULL DEFAULT '',
    model             TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd          REAL NOT NULL,
    PRIMARY KEY (day, key_id, user_id, team_id, model)
);
CREATE INDEX usage_daily_user_day_idx ON usage_daily (user_id, day);
CREATE INDEX usage_daily_team_day_idx ON usage_daily (team_id, day);
CREATE INDEX usage_daily_model_day_idx ON usage_daily (model, day);
INSERT INTO usage_daily
SELECT substr(created_at, 1, 10), key_id, user_id, coalesce(team_id, ''), model, count(*),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0)
FROM usage_events
GROUP BY 1, 2, 3, 4, 5
