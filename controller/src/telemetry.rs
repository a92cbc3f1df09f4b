//! The telemetry hub: the latest sample per node, a compact full-resolution history (default
//! 1 h) and one-minute rollups waiting to be written.
//!
//! Samples arrive from many session tasks at once. A read-mostly map (`RwLock`) finds the node;
//! each node has its own `Mutex`, held only to copy a sample in. The rollup writer task
//! ([`crate::Controller::start`] spawns it) drains finished minutes in batches; the retention
//! task deletes rollups older than the retention window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use nebula_protocol::containers::ContainerDetails;
use nebula_protocol::telemetry::{
    ContainerHealth, ContainerInfo, ContainerState, TelemetryInventory, TelemetrySample,
};
use uuid::Uuid;

use crate::store::millis;

/// One point of the in-memory history: the figures charts need, packed small (28 bytes), so an
/// hour at 5 s for 10,000 nodes stays around 200 MB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPoint {
    /// Unix seconds.
    pub t: u32,
    /// Percent × 100.
    pub cpu: u16,
    /// Load average (1 min) × 100.
    pub load1: u16,
    pub mem_used_mib: u32,
    pub net_rx_kib_s: u32,
    pub net_tx_kib_s: u32,
    /// Mean over GPUs; 255: no GPU figure.
    pub gpu_util: u8,
    /// Hottest GPU; 255: no figure.
    pub gpu_temp: u8,
    pub gpu_mem_used_mib: u32,
    pub containers_running: u16,
    pub containers_unhealthy: u16,
}

impl HistoryPoint {
    fn from_sample(s: &TelemetrySample, t: u32) -> Self {
        let rx = saturating_sum(s.interfaces.iter().map(|n| n.rx_bytes_per_sec));
        let tx = saturating_sum(s.interfaces.iter().map(|n| n.tx_bytes_per_sec));
        let utils: Vec<u8> = s
            .gpus
            .iter()
            .filter_map(|g| g.utilization_percent)
            .collect();
        let gpu_util = if utils.is_empty() {
            255
        } else {
            (utils.iter().map(|u| u32::from(*u)).sum::<u32>() / utils.len() as u32) as u8
        };
        let gpu_temp = s
            .gpus
            .iter()
            .filter_map(|g| g.temperature_c)
            .max()
            .unwrap_or(255);
        let gpu_mem = saturating_sum(s.gpus.iter().filter_map(|g| g.memory_used_bytes));
        HistoryPoint {
            t,
            cpu: (s.host.cpu_percent.clamp(0.0, 100.0) * 100.0) as u16,
            load1: (s.host.load[0].clamp(0.0, 655.0) * 100.0) as u16,
            mem_used_mib: (s.host.memory_used_bytes >> 20) as u32,
            net_rx_kib_s: (rx >> 10).min(u64::from(u32::MAX)) as u32,
            net_tx_kib_s: (tx >> 10).min(u64::from(u32::MAX)) as u32,
            gpu_util,
            gpu_temp,
            gpu_mem_used_mib: (gpu_mem >> 20).min(u64::from(u32::MAX)) as u32,
            containers_running: s
                .containers
                .iter()
                .filter(|c| c.state == ContainerState::Running)
                .count() as u16,
            containers_unhealthy: s
                .containers
                .iter()
                .filter(|c| c.health == ContainerHealth::Unhealthy)
                .count() as u16,
        }
    }
}

pub use nebula_types::api::telemetry::PointView;

/// Figures an agent reported that are not numbers (NaN, infinities) become 0 (or unknown, where
/// a figure may be unknown): every view stays a number its clients can read.
fn finite_figures(sample: &mut TelemetrySample) {
    let finite = |v: &mut f32| {
        if !v.is_finite() {
            *v = 0.0;
        }
    };
    finite(&mut sample.host.cpu_percent);
    sample.host.per_core_percent.iter_mut().for_each(finite);
    sample.host.load.iter_mut().for_each(finite);
    for c in &mut sample.containers {
        if c.cpu_percent.is_some_and(|v| !v.is_finite()) {
            c.cpu_percent = None;
        }
    }
}

/// Sum of numbers an agent reported: saturates instead of overflowing.
pub fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

impl From<&HistoryPoint> for PointView {
    fn from(p: &HistoryPoint) -> Self {
        let has_gpu = p.gpu_util != 255 || p.gpu_temp != 255;
        PointView {
            t: crate::store::rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_secs(p.t.into()),
            ),
            cpu_percent: f64::from(p.cpu) / 100.0,
            load1: f64::from(p.load1) / 100.0,
            memory_used_bytes: u64::from(p.mem_used_mib) << 20,
            net_rx_bytes_per_sec: u64::from(p.net_rx_kib_s) << 10,
            net_tx_bytes_per_sec: u64::from(p.net_tx_kib_s) << 10,
            gpu_utilization_percent: (p.gpu_util != 255).then_some(p.gpu_util),
            gpu_temperature_c: (p.gpu_temp != 255).then_some(p.gpu_temp),
            gpu_memory_used_bytes: has_gpu.then_some(u64::from(p.gpu_mem_used_mib) << 20),
            containers_running: p.containers_running,
            containers_unhealthy: p.containers_unhealthy,
        }
    }
}

pub use crate::store::Rollup;

#[derive(Debug, Default, Clone)]
struct Acc {
    n: u32,
    sum: f64,
    max: f64,
}

impl Acc {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.max = if self.n == 0 { v } else { self.max.max(v) };
        self.n += 1;
    }
    fn get(&self) -> Option<(f64, f64)> {
        (self.n > 0).then(|| (self.sum / f64::from(self.n), self.max))
    }
}

#[derive(Debug, Clone)]
struct MinuteAcc {
    minute: i64,
    n: i64,
    cpu: Acc,
    mem: Acc,
    load: Acc,
    rx: Acc,
    tx: Acc,
    gpu_util: Acc,
    gpu_mem: Acc,
    gpu_temp: Acc,
    running: Acc,
}

impl MinuteAcc {
    fn new(minute: i64) -> Self {
        MinuteAcc {
            minute,
            n: 0,
            cpu: Acc::default(),
            mem: Acc::default(),
            load: Acc::default(),
            rx: Acc::default(),
            tx: Acc::default(),
            gpu_util: Acc::default(),
            gpu_mem: Acc::default(),
            gpu_temp: Acc::default(),
            running: Acc::default(),
        }
    }

    fn add(&mut self, p: &HistoryPoint) {
        self.n += 1;
        self.cpu.add(f64::from(p.cpu) / 100.0);
        self.mem.add(f64::from(p.mem_used_mib) * 1048576.0);
        self.load.add(f64::from(p.load1) / 100.0);
        self.rx.add(f64::from(p.net_rx_kib_s) * 1024.0);
        self.tx.add(f64::from(p.net_tx_kib_s) * 1024.0);
        if p.gpu_util != 255 {
            self.gpu_util.add(f64::from(p.gpu_util));
        }
        if p.gpu_temp != 255 {
            self.gpu_temp.add(f64::from(p.gpu_temp));
            self.gpu_mem.add(f64::from(p.gpu_mem_used_mib) * 1048576.0);
        }
        self.running.add(f64::from(p.containers_running));
    }

    fn finish(&self, node_id: Uuid) -> Rollup {
        let z = (0.0, 0.0);
        Rollup {
            node_id,
            minute: self.minute,
            samples: self.n,
            cpu: self.cpu.get().unwrap_or(z),
            mem_used: self.mem.get().unwrap_or(z),
            load1: self.load.get().unwrap_or(z),
            net_rx: self.rx.get().unwrap_or(z),
            net_tx: self.tx.get().unwrap_or(z),
            gpu_util: self.gpu_util.get(),
            gpu_mem_used: self.gpu_mem.get(),
            gpu_temp: self.gpu_temp.get(),
            containers_running: self.running.get().map(|v| v.0).unwrap_or(0.0),
        }
    }
}

/// Why a sample was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No session registered for the node (raced with a disconnect).
    UnknownNode,
    /// The sample refers to an inventory the controller has not received.
    UnknownEpoch,
    /// Vector lengths do not match the inventory.
    Shape,
    /// Older than a sample already taken (datagrams can be reordered).
    OutOfOrder,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownNode => "unknown_node",
            DropReason::UnknownEpoch => "unknown_epoch",
            DropReason::Shape => "shape",
            DropReason::OutOfOrder => "out_of_order",
        }
    }
}

/// A change worth an event: a container's state or health moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerChange {
    pub container: String,
    pub name: String,
    pub state: ContainerState,
    pub health: ContainerHealth,
}

#[derive(Debug)]
pub struct NodeTelemetry {
    pub name: String,
    pub inventory: Option<Arc<TelemetryInventory>>,
    /// Ports and start times of the inventory's containers (agents from 1.6 on).
    pub details: Option<Arc<ContainerDetails>>,
    pub latest: Option<Arc<TelemetrySample>>,
    /// Unix milliseconds when `latest` arrived.
    pub received_at_ms: i64,
    history: VecDeque<HistoryPoint>,
    minute: Option<MinuteAcc>,
    /// Each container's last state and health, by id: changes are found by id, so that one
    /// that also changes the inventory (a killed container's exit code) is still reported.
    states: HashMap<String, (ContainerState, ContainerHealth)>,
}

/// A copy of one node's current telemetry.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: Uuid,
    pub name: String,
    pub inventory: Option<Arc<TelemetryInventory>>,
    /// Ports and start times of the inventory's containers, when the agent sent them for
    /// the inventory's epoch.
    pub details: Option<Arc<ContainerDetails>>,
    pub latest: Option<Arc<TelemetrySample>>,
    pub received_at_ms: i64,
}

impl NodeTelemetry {
    /// The details, when they belong to the inventory in force (same epoch and length).
    fn current_details(&self) -> Option<Arc<ContainerDetails>> {
        let inv = self.inventory.as_ref()?;
        self.details
            .clone()
            .filter(|d| d.epoch == inv.epoch && d.containers.len() == inv.containers.len())
    }
}

#[derive(Debug)]
pub struct TelemetryHub {
    nodes: RwLock<HashMap<Uuid, Arc<Mutex<NodeTelemetry>>>>,
    finished: Mutex<Vec<Rollup>>,
    history_window: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TelemetryHub {
    pub fn new(history_window: Duration) -> Self {
        TelemetryHub {
            nodes: RwLock::new(HashMap::new()),
            finished: Mutex::new(Vec::new()),
            history_window,
        }
    }

    fn node(&self, id: Uuid) -> Option<Arc<Mutex<NodeTelemetry>>> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Every node's handle, copied out so that the map's lock is not held while nodes are read.
    fn all_nodes(&self) -> Vec<(Uuid, Arc<Mutex<NodeTelemetry>>)> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// A node's session started (keeps its history across reconnects).
    pub fn register(&self, id: Uuid, name: &str) {
        let mut map = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(id).or_insert_with(|| {
            Arc::new(Mutex::new(NodeTelemetry {
                name: name.to_owned(),
                inventory: None,
                details: None,
                latest: None,
                received_at_ms: 0,
                history: VecDeque::new(),
                minute: None,
                states: HashMap::new(),
            }))
        });
        lock(entry).name = name.to_owned();
    }

    /// A node was removed from the fleet.
    pub fn forget(&self, id: Uuid) {
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Take a new inventory. Returns the containers the previous one had and this one lacks
    /// (removed since), so that removal can be acted on as quickly as a stop.
    pub fn set_inventory(
        &self,
        id: Uuid,
        inv: TelemetryInventory,
    ) -> Result<Vec<ContainerInfo>, DropReason> {
        let node = self.node(id).ok_or(DropReason::UnknownNode)?;
        let mut n = lock(&node);
        let removed = match &n.inventory {
            Some(old) => old
                .containers
                .iter()
                .filter(|c| !inv.containers.iter().any(|new| new.id == c.id))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        n.inventory = Some(Arc::new(inv));
        Ok(removed)
    }

    /// Take the details of an inventory's containers (sent right after it).
    pub fn set_details(&self, id: Uuid, details: ContainerDetails) -> Result<(), DropReason> {
        let node = self.node(id).ok_or(DropReason::UnknownNode)?;
        lock(&node).details = Some(Arc::new(details));
        Ok(())
    }

    /// Take a sample. Returns the container changes since the previous sample.
    pub fn ingest(
        &self,
        id: Uuid,
        mut sample: TelemetrySample,
    ) -> Result<Vec<ContainerChange>, DropReason> {
        finite_figures(&mut sample);
        let node = self.node(id).ok_or(DropReason::UnknownNode)?;
        let now = SystemTime::now();
        let now_ms = millis(now);
        let mut n = lock(&node);
        let Some(inv) = n.inventory.clone() else {
            return Err(DropReason::UnknownEpoch);
        };
        if inv.epoch != sample.epoch {
            return Err(DropReason::UnknownEpoch);
        }
        if sample.disks_used_bytes.len() != inv.disks.len()
            || sample.interfaces.len() != inv.interfaces.len()
            || sample.gpus.len() != inv.gpus.len()
            || sample.containers.len() != inv.containers.len()
        {
            return Err(DropReason::Shape);
        }
        if let Some(prev) = n.latest.as_ref() {
            if prev.seq >= sample.seq && prev.epoch == sample.epoch {
                return Err(DropReason::OutOfOrder);
            }
        }
        let mut changes = Vec::new();
        let first = n.latest.is_none();
        let mut states = HashMap::with_capacity(sample.containers.len());
        for (c, s) in inv.containers.iter().zip(&sample.containers) {
            let now = (s.state, s.health);
            if !first && n.states.get(&c.id).is_some_and(|before| *before != now) {
                changes.push(ContainerChange {
                    container: c.id.clone(),
                    name: c.name.clone(),
                    state: s.state,
                    health: s.health,
                });
            }
            states.insert(c.id.clone(), now);
        }
        n.states = states;
        // Timestamps are the controller's (agents' clocks may be off).
        let t = (now_ms / 1000) as u32;
        let point = HistoryPoint::from_sample(&sample, t);
        n.history.push_back(point);
        let horizon = t.saturating_sub(self.history_window.as_secs() as u32);
        while n.history.front().is_some_and(|p| p.t < horizon) {
            n.history.pop_front();
        }
        let minute = now_ms / 60_000 * 60_000;
        let done = match n.minute.as_mut() {
            Some(acc) if acc.minute == minute => {
                acc.add(&point);
                None
            }
            _ => {
                let mut acc = MinuteAcc::new(minute);
                acc.add(&point);
                n.minute.replace(acc)
            }
        };
        n.latest = Some(Arc::new(sample));
        n.received_at_ms = now_ms;
        drop(n);
        if let Some(done) = done {
            lock(&self.finished).push(done.finish(id));
        }
        Ok(changes)
    }

    /// Rollups ready to store: finished minutes, plus minutes that ended for nodes that went
    /// quiet. `now_ms` decides which open minutes are over.
    pub fn take_rollups(&self, now_ms: i64) -> Vec<Rollup> {
        let current = now_ms / 60_000 * 60_000;
        let nodes = self.all_nodes();
        let mut out = std::mem::take(&mut *lock(&self.finished));
        for (id, node) in nodes {
            let mut n = lock(&node);
            if n.minute.as_ref().is_some_and(|m| m.minute < current) {
                if let Some(m) = n.minute.take() {
                    out.push(m.finish(id));
                }
            }
        }
        out
    }

    /// Put rollups back after a failed write (they are retried next time).
    pub fn requeue(&self, mut rollups: Vec<Rollup>) {
        let mut f = lock(&self.finished);
        // Bound what waits in memory if the database stays down: keep the newest.
        const MAX_PENDING: usize = 1_000_000;
        f.append(&mut rollups);
        if f.len() > MAX_PENDING {
            let excess = f.len() - MAX_PENDING;
            f.drain(..excess);
        }
    }

    pub fn view(&self, id: Uuid) -> Option<NodeView> {
        let node = self.node(id)?;
        let n = lock(&node);
        Some(NodeView {
            id,
            name: n.name.clone(),
            inventory: n.inventory.clone(),
            details: n.current_details(),
            latest: n.latest.clone(),
            received_at_ms: n.received_at_ms,
        })
    }

    /// Free GPU memory on a node, from its latest sample (read in place: this runs for every
    /// gateway request, which should not copy the node's inventory and sample).
    pub fn free_vram(&self, id: Uuid) -> u64 {
        let Some(node) = self.node(id) else {
            return 0;
        };
        let n = lock(&node);
        let (Some(inv), Some(sample)) = (&n.inventory, &n.latest) else {
            return 0;
        };
        saturating_sum(inv.gpus.iter().zip(sample.gpus.iter()).map(|(g, s)| {
            g.memory_total_bytes
                .saturating_sub(s.memory_used_bytes.unwrap_or(g.memory_total_bytes))
        }))
    }

    /// History points at or after `since` (Unix seconds).
    pub fn history(&self, id: Uuid, since: u32) -> Vec<HistoryPoint> {
        let Some(node) = self.node(id) else {
            return Vec::new();
        };
        let n = lock(&node);
        let start = n.history.partition_point(|p| p.t < since);
        n.history.range(start..).copied().collect()
    }

    pub fn snapshot(&self) -> Vec<NodeView> {
        let nodes = self.all_nodes();
        nodes
            .into_iter()
            .map(|(id, node)| {
                let n = lock(&node);
                NodeView {
                    id,
                    name: n.name.clone(),
                    inventory: n.inventory.clone(),
                    details: n.current_details(),
                    latest: n.latest.clone(),
                    received_at_ms: n.received_at_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::telemetry::{ContainerInfo, ContainerSample};

    fn inv(epoch: u32, containers: usize) -> TelemetryInventory {
        TelemetryInventory {
            epoch,
            containers: (0..containers)
                .map(|i| ContainerInfo {
                    id: format!("c{i}"),
                    name: format!("n{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn sample(epoch: u32, seq: u64, states: &[ContainerState]) -> TelemetrySample {
        TelemetrySample {
            epoch,
            seq,
            containers: states
                .iter()
                .map(|s| ContainerSample {
                    state: *s,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn samples_need_their_inventory_and_shape_and_order() {
        let hub = TelemetryHub::new(Duration::from_secs(3600));
        let id = Uuid::now_v7();
        assert_eq!(
            hub.ingest(id, sample(1, 1, &[])),
            Err(DropReason::UnknownNode)
        );
        hub.register(id, "n");
        assert_eq!(
            hub.ingest(id, sample(1, 1, &[])),
            Err(DropReason::UnknownEpoch)
        );
        hub.set_inventory(id, inv(1, 1)).unwrap();
        assert_eq!(hub.ingest(id, sample(1, 1, &[])), Err(DropReason::Shape));
        assert!(hub
            .ingest(id, sample(1, 2, &[ContainerState::Running]))
            .unwrap()
            .is_empty());
        assert_eq!(
            hub.ingest(id, sample(1, 1, &[ContainerState::Running])),
            Err(DropReason::OutOfOrder)
        );
        let changes = hub
            .ingest(id, sample(1, 3, &[ContainerState::Exited]))
            .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].state, ContainerState::Exited);
        assert_eq!(changes[0].name, "n0");
        assert_eq!(hub.history(id, 0).len(), 2);
        assert_eq!(hub.view(id).unwrap().latest.unwrap().seq, 3);
    }

    #[test]
    fn finished_minutes_become_rollups() {
        let hub = TelemetryHub::new(Duration::from_secs(3600));
        let id = Uuid::now_v7();
        hub.register(id, "n");
        hub.set_inventory(id, inv(1, 0)).unwrap();
        let mut s = sample(1, 1, &[]);
        s.host.cpu_percent = 10.0;
        hub.ingest(id, s.clone()).unwrap();
        s.seq = 2;
        s.host.cpu_percent = 30.0;
        hub.ingest(id, s).unwrap();
        // Within the same minute nothing is ready; a minute later it is.
        let now = millis(SystemTime::now());
        let early = hub.take_rollups(now);
        let late = hub.take_rollups(now + 120_000);
        let all: Vec<Rollup> = early.into_iter().chain(late).collect();
        let total: i64 = all.iter().map(|r| r.samples).sum();
        assert_eq!(total, 2);
        let max = all.iter().map(|r| r.cpu.1).fold(0.0, f64::max);
        assert!((max - 30.0).abs() < 0.01, "{max}");
        assert!(hub.take_rollups(now + 240_000).is_empty());
    }
}
