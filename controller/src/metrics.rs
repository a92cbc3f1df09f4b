//! Prometheus metrics (prometheus-client): the controller's own counters, plus per-node gauges
//! produced at scrape time from the telemetry hub (so nodes that leave leave no stale series).

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::telemetry::TelemetryHub;

/// Why a telemetry sample was dropped.
pub type DropLabels = Vec<(&'static str, &'static str)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub samples_accepted: Counter,
    pub samples_dropped: Family<DropLabels, Counter>,
    pub frames_rejected: Counter,
    pub store_write_seconds: Histogram,
    /// Jobs that reached a final state, by state.
    pub jobs_finished: Family<DropLabels, Counter>,
    /// Jobs not finished (queued, dispatched, running).
    pub jobs_active: Gauge,
    /// Reconcile runs, and deploys by outcome.
    pub reconcile_runs: Counter,
    pub deploys_finished: Family<Vec<(&'static str, String)>, Counter>,
    /// Seconds the last reconcile run's plan took.
    pub plan_seconds: Histogram,
    /// Connections and requests turned away before authentication, by reason.
    pub connections_refused: Family<DropLabels, Counter>,
    /// Operations refused by authorization, by operation and front end.
    pub refused_ops: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Job-engine write batches refused because this replica no longer leads (its term).
    pub job_writes_refused: Counter,
    /// Event notifications between replicas: sent, received, resync.
    pub events_fanout: Family<DropLabels, Counter>,
    /// Agent sessions the leader moved to a replica holding fewer.
    pub sessions_moved: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nebula");
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with a live session",
            agents_connected.clone(),
        );
        let samples_accepted = Counter::default();
        registry.register(
            "telemetry_samples_accepted",
            "Telemetry samples accepted",
            samples_accepted.clone(),
        );
        let samples_dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "telemetry_samples_dropped",
            "Telemetry samples dropped, by reason",
            samples_dropped.clone(),
        );
        let frames_rejected = Counter::default();
        registry.register(
            "frames_rejected",
            "Malformed or oversized frames and datagrams from agents",
            frames_rejected.clone(),
        );
        let store_write_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "store_write_seconds",
            "Latency of batched writes to the database (telemetry rollups, jobs)",
            store_write_seconds.clone(),
        );
        let jobs_finished = Family::<DropLabels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by state",
            jobs_finished.clone(),
        );
        let jobs_active = Gauge::default();
        registry.register(
            "jobs_active",
            "Jobs queued, dispatched or running",
            jobs_active.clone(),
        );
        let reconcile_runs = Counter::default();
        registry.register(
            "reconcile_runs",
            "Reconciler runs (each reads the full state and plans)",
            reconcile_runs.clone(),
        );
        let deploys_finished = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "deploys_finished",
            "Deploys that ended, by outcome (deployed, rolled-back, failed, ...)",
            deploys_finished.clone(),
        );
        let plan_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "plan_seconds",
            "Time to gather the observed state and compute a plan",
            plan_seconds.clone(),
        );
        let connections_refused = Family::<DropLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "QUIC connections and enrollments turned away by a limit, by reason (retry means \
             a QUIC address validation was asked for)",
            connections_refused.clone(),
        );
        let refused_ops = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "operations_refused",
            "Operations refused because the caller's role does not allow them, by operation and \
             front end (api, dashboard)",
            refused_ops.clone(),
        );
        let job_writes_refused = Counter::default();
        registry.register(
            "job_writes_refused",
            "Batches of job states and log lines refused because this replica no longer leads \
             (a deposed leader's term)",
            job_writes_refused.clone(),
        );
        let events_fanout = Family::<DropLabels, Counter>::default();
        registry.register(
            "events_fanout",
            "Notifications of events between replicas (PostgreSQL): sent, received, and resync \
             (events may have been missed; views refreshed in full)",
            events_fanout.clone(),
        );
        let sessions_moved = Counter::default();
        registry.register(
            "sessions_moved",
            "Agent sessions the leader moved to a replica holding fewer than its share",
            sessions_moved.clone(),
        );
        Metrics {
            sessions_moved,
            events_fanout,
            job_writes_refused,
            refused_ops,
            connections_refused,
            registry,
            reconcile_runs,
            deploys_finished,
            plan_seconds,
            agents_connected,
            samples_accepted,
            samples_dropped,
            frames_rejected,
            store_write_seconds,
            jobs_finished,
            jobs_active,
        }
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn dropped(&self, reason: &'static str) {
        self.samples_dropped
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Register the per-node collector (once, after the hub exists).
    pub fn register_nodes(&mut self, hub: Weak<TelemetryHub>) {
        self.registry
            .register_collector(Box::new(NodeCollector { hub }));
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct NodeCollector {
    hub: Weak<TelemetryHub>,
}

type L = Vec<(&'static str, String)>;

fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        let g = prometheus_client::metrics::gauge::ConstGauge::new(*v);
        let enc = metric.encode_family(labels)?;
        g.encode(enc)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(hub) = self.hub.upgrade() else {
            return Ok(());
        };
        let mut cpu = Vec::new();
        let mut mem_used = Vec::new();
        let mut mem_total = Vec::new();
        let mut gpu_util = Vec::new();
        let mut gpu_mem = Vec::new();
        let mut gpu_temp = Vec::new();
        let mut containers = Vec::new();
        for view in hub.snapshot() {
            let node = view.name.clone();
            let Some(s) = view.latest.as_ref() else {
                continue;
            };
            cpu.push((vec![("node", node.clone())], f64::from(s.host.cpu_percent)));
            mem_used.push((
                vec![("node", node.clone())],
                s.host.memory_used_bytes as f64,
            ));
            mem_total.push((
                vec![("node", node.clone())],
                s.host.memory_total_bytes as f64,
            ));
            if let Some(inv) = view.inventory.as_ref() {
                for (g, info) in s.gpus.iter().zip(&inv.gpus) {
                    let l = vec![
                        ("node", node.clone()),
                        ("gpu", info.uuid.clone()),
                        ("model", info.name.clone()),
                    ];
                    if let Some(u) = g.utilization_percent {
                        gpu_util.push((l.clone(), f64::from(u)));
                    }
                    if let Some(m) = g.memory_used_bytes {
                        gpu_mem.push((l.clone(), m as f64));
                    }
                    if let Some(t) = g.temperature_c {
                        gpu_temp.push((l, f64::from(t)));
                    }
                }
            }
            let mut by_state: std::collections::BTreeMap<&'static str, u32> = Default::default();
            for c in &s.containers {
                *by_state.entry(c.state.as_str()).or_default() += 1;
                if c.health == nebula_protocol::telemetry::ContainerHealth::Unhealthy {
                    *by_state.entry("unhealthy").or_default() += 1;
                }
            }
            for (state, n) in by_state {
                containers.push((
                    vec![("node", node.clone()), ("state", state.to_owned())],
                    f64::from(n),
                ));
            }
        }
        family(
            &mut encoder,
            "node_cpu_percent",
            "Host CPU use, percent of all cores",
            &cpu,
        )?;
        family(
            &mut encoder,
            "node_memory_used_bytes",
            "Host memory in use",
            &mem_used,
        )?;
        family(
            &mut encoder,
            "node_memory_total_bytes",
            "Host memory installed",
            &mem_total,
        )?;
        family(
            &mut encoder,
            "node_gpu_utilization_percent",
            "GPU utilisation",
            &gpu_util,
        )?;
        family(
            &mut encoder,
            "node_gpu_memory_used_bytes",
            "GPU memory in use",
            &gpu_mem,
        )?;
        family(
            &mut encoder,
            "node_gpu_temperature_celsius",
            "GPU temperature",
            &gpu_temp,
        )?;
        family(
            &mut encoder,
            "node_containers",
            "Containers by state (\"unhealthy\" counts running containers failing health checks)",
            &containers,
        )?;
        Ok(())
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;
