DROP INDEX IF EXISTS messages_burn_due_idx;
ALTER TABLE messages
    DROP COLUMN IF EXISTS burned_at,
    DROP COLUMN IF EXISTS burn_due_at;
