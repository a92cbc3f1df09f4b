-- One-minute telemetry rollups per node (average and maximum), kept for a retention window.
CREATE TABLE telemetry_rollups (
    node_id            TEXT NOT NULL,
    minute             BIGINT NOT NULL,
    samples            BIGINT NOT NULL,
    cpu_avg            REAL NOT NULL,
    cpu_max            REAL NOT NULL,
    mem_used_avg       REAL NOT NULL,
    mem_used_max       REAL NOT NULL,
    load1_avg          REAL NOT NULL,
    load1_max          REAL NOT NULL,
    net_rx_avg         REAL NOT NULL,
    net_rx_max         REAL NOT NULL,
    net_tx_avg         REAL NOT NULL,
    net_tx_max         REAL NOT NULL,
    gpu_util_avg       REAL,
    gpu_util_max       REAL,
    gpu_mem_used_avg   REAL,
    gpu_mem_used_max   REAL,
    gpu_temp_avg       REAL,
    gpu_temp_max       REAL,
    containers_running REAL NOT NULL,
    PRIMARY KEY (node_id, minute)
);
CREATE INDEX telemetry_rollups_minute ON telemetry_rollups (minute);
