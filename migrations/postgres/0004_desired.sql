-- Desired state: every accepted service map (the newest is in force), the deployment history
-- per service and node, and rollback pins.
CREATE TABLE desired_state (
    version    BIGINT PRIMARY KEY,
    document   TEXT NOT NULL,
    digest     TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE deployments (
    id              TEXT PRIMARY KEY,
    service         TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    node_name       TEXT NOT NULL,
    action          TEXT NOT NULL,
    revision        TEXT NOT NULL,
    previous        TEXT NOT NULL,
    spec            TEXT NOT NULL,
    trigger_reason  TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    message         TEXT,
    job_id          TEXT,
    desired_version BIGINT,
    started_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX deployments_service ON deployments (service, started_at);

CREATE TABLE service_pins (
    service       TEXT PRIMARY KEY,
    revision      TEXT NOT NULL,
    spec          TEXT NOT NULL,
    base_revision TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
