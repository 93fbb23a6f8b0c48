-- Chatify schema v1: conversations, members, per-user state and the message archive.
--
-- Message ids are UUIDv7 derived from (sender, client_msg_id) and the gateway receive
-- time, so created_at is a function of message_id: a replay writes the same row.

CREATE TABLE sessions (
    session_id      text PRIMARY KEY,             -- p2p:{lo}:{hi} or grp:{id}
    kind            text NOT NULL CHECK (kind IN ('single', 'group')),
    name            text,
    owner_id        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'group') = (session_id LIKE 'grp:%'))
);

CREATE TABLE session_members (
    session_id      text NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    user_id         text NOT NULL,
    role            text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member')),
    joined_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, user_id)
);
-- "my sessions" without a scan of every member row
CREATE INDEX session_members_user_idx ON session_members (user_id, session_id);
-- a group has at most one owner
CREATE UNIQUE INDEX session_members_one_owner_idx ON session_members (session_id) WHERE role = 'owner';

-- Per-user state of a session: read cursor (monotonic) and clear watermark (ClearSession
-- hides seq <= cleared_seq for this user without touching message rows).
CREATE TABLE user_session_state (
    user_id         text NOT NULL,
    session_id      text NOT NULL,
    read_seq        bigint NOT NULL DEFAULT 0 CHECK (read_seq >= 0),
    cleared_seq     bigint NOT NULL DEFAULT 0 CHECK (cleared_seq >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, session_id)
);

-- Messages one user no longer sees: deleted "for me", or burned after reading. A burned
-- message is hidden from hidden_from on (read time + its burn timer).
CREATE TABLE message_hides (
    user_id         text NOT NULL,
    message_id      uuid NOT NULL,
    session_id      text NOT NULL,
    seq             bigint NOT NULL,
    reason          text NOT NULL CHECK (reason IN ('deleted', 'burned')),
    hidden_from     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);
CREATE INDEX message_hides_session_idx ON message_hides (user_id, session_id, seq);

-- The archive. Columns are shared by both layouts; constraints differ below.
CREATE TABLE messages (
    message_id          uuid NOT NULL,
    session_id          text NOT NULL,
    seq                 bigint NOT NULL CHECK (seq > 0),
    sender_id           text NOT NULL,
    client_msg_id       text NOT NULL,
    message_type        text NOT NULL
        CHECK (message_type IN ('text', 'image', 'file', 'system', 'control', 'indicator')),
    content             bytea NOT NULL,
    created_at          timestamptz NOT NULL,
    burn_after_seconds  integer CHECK (burn_after_seconds > 0),
    recalled_at         timestamptz,
    recalled_by         text
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        -- TimescaleDB: a hypertable chunked by day. Unique indexes must contain the
        -- partitioning column; created_at is derived from message_id, so
        -- (message_id, created_at) is still one row per message.
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        ALTER TABLE messages
            ADD CONSTRAINT messages_pkey PRIMARY KEY (message_id, created_at),
            ADD CONSTRAINT messages_session_seq_key UNIQUE (session_id, seq, created_at);
        PERFORM create_hypertable('messages', 'created_at', chunk_time_interval => INTERVAL '1 day');
    ELSE
        -- Plain PostgreSQL: global uniqueness, and a BRIN index for time ranges (rows
        -- arrive in roughly created_at order, so BRIN stays tiny).
        ALTER TABLE messages
            ADD CONSTRAINT messages_pkey PRIMARY KEY (message_id),
            ADD CONSTRAINT messages_session_seq_key UNIQUE (session_id, seq),
            ADD CONSTRAINT messages_sender_client_msg_key UNIQUE (sender_id, client_msg_id);
        CREATE INDEX messages_created_at_brin_idx ON messages USING brin (created_at);
    END IF;
END
$$;

-- time-range history of one session
CREATE INDEX messages_session_created_idx ON messages (session_id, created_at);
