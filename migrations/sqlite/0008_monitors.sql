-- Monitors made through the API (the map's own live in the map), their results rolled up per
-- hour and node (uptime and latency; the controller keeps the last 30 days), and filters on
-- alert sinks (JSON: rules, nodes, services, labels).
CREATE TABLE monitors (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE monitor_hours (
    monitor        TEXT NOT NULL,
    node           TEXT NOT NULL,
    hour           BIGINT NOT NULL,
    checks         BIGINT NOT NULL,
    up             BIGINT NOT NULL,
    latency_sum_us BIGINT NOT NULL,
    latency_max_us BIGINT NOT NULL,
    PRIMARY KEY (monitor, node, hour)
);
CREATE INDEX monitor_hours_hour ON monitor_hours (hour);

ALTER TABLE alert_sinks ADD COLUMN filters TEXT NOT NULL DEFAULT '{}';
