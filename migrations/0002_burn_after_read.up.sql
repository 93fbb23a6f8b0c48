-- Burn-after-read: when the first recipient reads a message with burn_after_seconds, its
-- timer starts (burn_due_at); storage-reader's sweep purges the content from MongoDB, the
-- hot cache and Postgres once it is due, and records burned_at. The purge is real: the
-- content bytes are overwritten, not flagged.
ALTER TABLE messages
    ADD COLUMN burn_due_at timestamptz,
    ADD COLUMN burned_at timestamptz;

-- The sweep's work list: due and not yet burned.
CREATE INDEX messages_burn_due_idx ON messages (burn_due_at)
    WHERE burn_due_at IS NOT NULL AND burned_at IS NULL;
