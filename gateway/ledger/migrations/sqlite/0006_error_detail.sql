-- What more is known of an error than its code: the cause of a failed connection
-- (dns, refused, tls, ...) or the timeout that ran out. A small fixed set, never free text.
ALTER TABLE usage_events ADD COLUMN error_detail TEXT;
