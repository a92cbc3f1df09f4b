-- The Discord bot: each server's settings (JSON), Discord accounts linked to users, one-time
-- link codes (hashed), and the messages alerts were posted as, so their buttons and their
-- resolution find them after a restart.
CREATE TABLE discord_guilds (
    guild_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    settings   TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE discord_links (
    discord_user TEXT PRIMARY KEY,
    discord_name TEXT NOT NULL,
    username     TEXT NOT NULL,
    linked_at    BIGINT NOT NULL
);

CREATE TABLE discord_link_codes (
    code_hash  TEXT PRIMARY KEY,
    username   TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE discord_alert_messages (
    fingerprint TEXT NOT NULL,
    channel_id  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    posted_at   BIGINT NOT NULL,
    PRIMARY KEY (fingerprint, channel_id)
);
