DROP TABLE IF EXISTS messages;
DROP TABLE IF EXISTS message_hides;
DROP TABLE IF EXISTS user_session_state;
DROP TABLE IF EXISTS session_members;
DROP TABLE IF EXISTS sessions;
