-- A job's idempotency key (a workflow step's `RUN/STEP/ATTEMPT`): creating a job with a key
-- that a job already has returns that job.
ALTER TABLE jobs ADD COLUMN idem_key TEXT;
CREATE INDEX jobs_idem_key ON jobs (idem_key);

-- Workflow definitions: from workflows.yml (`file`) or the API (`api`); `definition` is the
-- checked workflow as JSON.
CREATE TABLE workflows (
    name        TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    definition  TEXT NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Runs, each with the definition it started with (editing a workflow never changes a run).
CREATE TABLE workflow_runs (
    id                TEXT PRIMARY KEY,
    workflow          TEXT NOT NULL,
    definition        TEXT NOT NULL,
    state             TEXT NOT NULL,
    inputs            TEXT NOT NULL,
    trigger_data      TEXT NOT NULL,
    concurrency_group TEXT,
    cancelled         BIGINT NOT NULL,
    created_by        TEXT NOT NULL,
    created_role      TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    error             TEXT
);
CREATE INDEX workflow_runs_state ON workflow_runs (state);
CREATE INDEX workflow_runs_workflow ON workflow_runs (workflow, id);

-- Every attempt of every step; a step's latest attempt is its state. Attempt 0 is a step that
-- ended without one (skipped, or its parameters did not render).
CREATE TABLE workflow_steps (
    run_id      TEXT NOT NULL,
    step        TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    job_id      TEXT,
    outputs     TEXT,
    error       TEXT,
    not_before  BIGINT,
    started_at  BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (run_id, step, attempt)
);

-- Webhook deliveries taken, by the sender's delivery id: a replayed one starts nothing.
CREATE TABLE workflow_deliveries (
    workflow    TEXT NOT NULL,
    delivery    TEXT NOT NULL,
    run_id      TEXT,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (workflow, delivery)
);

-- Each schedule's last look (`schedule`: its cron and zone): times after it are due.
CREATE TABLE workflow_schedules (
    workflow     TEXT NOT NULL,
    schedule     TEXT NOT NULL,
    last_checked BIGINT NOT NULL,
    PRIMARY KEY (workflow, schedule)
);
