-- One-minute telemetry rollups per node (average and maximum), kept for a retention window.
CREATE TABLE telemetry_rollups (
    node_id            TEXT NOT NULL,
    minute             BIGINT NOT NULL,
    samples            BIGINT NOT NULL,
    cpu_avg            DOUBLE PRECISION NOT NULL,
    cpu_max            DOUBLE PRECISION NOT NULL,
    mem_used_avg       DOUBLE PRECISION NOT NULL,
    mem_used_max       DOUBLE PRECISION NOT NULL,
    load1_avg          DOUBLE PRECISION NOT NULL,
    load1_max          DOUBLE PRECISION NOT NULL,
    net_rx_avg         DOUBLE PRECISION NOT NULL,
    net_rx_max         DOUBLE PRECISION NOT NULL,
    net_tx_avg         DOUBLE PRECISION NOT NULL,
    net_tx_max         DOUBLE PRECISION NOT NULL,
    gpu_util_avg       DOUBLE PRECISION,
    gpu_util_max       DOUBLE PRECISION,
    gpu_mem_used_avg   DOUBLE PRECISION,
    gpu_mem_used_max   DOUBLE PRECISION,
    gpu_temp_avg       DOUBLE PRECISION,
    gpu_temp_max       DOUBLE PRECISION,
    containers_running DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node_id, minute)
);
CREATE INDEX telemetry_rollups_minute ON telemetry_rollups (minute);
