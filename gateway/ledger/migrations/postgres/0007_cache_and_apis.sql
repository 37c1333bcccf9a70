-- Of prompt_tokens, those read from and written to the provider's prompt cache (priced
-- apart), and the API families the caller and the provider spoke (they differ when the
-- gateway translated between them). NULL on rows written before this migration.
ALTER TABLE usage_events ADD COLUMN cached_prompt_tokens integer;
ALTER TABLE usage_events ADD COLUMN cache_write_tokens integer;
ALTER TABLE usage_events ADD COLUMN caller_api text;
ALTER TABLE usage_events ADD COLUMN provider_api text;
