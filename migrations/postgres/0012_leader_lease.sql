-- Replicas on one PostgreSQL elect a leader through this one row: the holder renews it before
-- `expires_at`; whoever takes it over (after it expired or was released) raises `term`. Writes
-- only the leader may make check the term in their own transaction (fencing). A controller on
-- SQLite is always the leader and never writes it.
CREATE TABLE leader_lease (
    id         BIGINT PRIMARY KEY,
    holder     TEXT NOT NULL,
    term       BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    renewed_at BIGINT NOT NULL
);

-- Every replica, kept fresh by its election loop: what agents and people need to reach it.
CREATE TABLE replicas (
    id          TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    http_url    TEXT NOT NULL,
    quic_addr   TEXT NOT NULL,
    version     TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    seen_at     BIGINT NOT NULL
);

-- The fleet CA this database belongs to (its SHA-256 pin): a controller whose data dir holds
-- another CA, or none, refuses to start on it instead of making a second one.
CREATE TABLE fleet_identity (
    id         BIGINT PRIMARY KEY,
    ca_pin     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
