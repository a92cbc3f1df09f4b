-- Alerting: the evaluator's whole state (one JSON value, rewritten with the notifications it
-- produced, in one transaction), where notifications go, silences, and the outbox every
-- notification is written to before it is sent.
CREATE TABLE alert_engine (
    id         BIGINT PRIMARY KEY,
    state      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE alert_sinks (
    name         TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    url          TEXT NOT NULL,
    secret       TEXT NOT NULL,
    min_severity TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE TABLE alert_silences (
    id         TEXT PRIMARY KEY,
    matchers   TEXT NOT NULL,
    starts_at  BIGINT NOT NULL,
    ends_at    BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    comment    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE alert_outbox (
    id         TEXT PRIMARY KEY,
    sink       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    state      TEXT NOT NULL,
    attempts   BIGINT NOT NULL,
    next_at    BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at    BIGINT
);
CREATE INDEX alert_outbox_due ON alert_outbox (state, next_at);
