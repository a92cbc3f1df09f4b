-- Jobs: every piece of work an agent does for the controller. A row is written before the job
-- is dispatched; every state change updates it (state, its timestamp, the reason).
CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    work           TEXT NOT NULL,
    target         TEXT NOT NULL,
    state          TEXT NOT NULL,
    node_id        TEXT,
    node_name      TEXT,
    attempt        BIGINT NOT NULL,
    max_attempts   BIGINT NOT NULL,
    idempotent     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    dispatched_at  BIGINT,
    started_at     BIGINT,
    finished_at    BIGINT,
    deadline       BIGINT,
    routing        TEXT,
    reason         TEXT,
    exit_code      BIGINT,
    error          TEXT,
    output         TEXT,
    excluded_nodes TEXT NOT NULL,
    logs_next      BIGINT NOT NULL
);
CREATE INDEX jobs_state ON jobs (state);


-- Log lines of each attempt, in order.
CREATE TABLE job_logs (
    job_id   TEXT NOT NULL,
    attempt  BIGINT NOT NULL,
    seq      BIGINT NOT NULL,
    at       BIGINT NOT NULL,
    stream   TEXT NOT NULL,
    line     TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, seq)
);

-- Who did what, when: jobs created and cancelled, tokens, node removals.
CREATE TABLE audit_log (
    id      TEXT PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX audit_at ON audit_log (at);
