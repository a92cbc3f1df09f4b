-- AI agents: from workflows.yml (`file`) or the API (`api`); `definition` is the checked agent
-- as JSON. The built-in agents are not stored: a row of the same name replaces one.
CREATE TABLE agents (
    name        TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    definition  TEXT NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
