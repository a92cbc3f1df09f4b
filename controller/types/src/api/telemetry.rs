//! Telemetry: a node's latest figures and history, and every container in the fleet.

use nebula_protocol::telemetry::HostSample;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `GET /api/v1/nodes/{name}/telemetry`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NodeTelemetry {
    pub node: String,
    /// `raw` (the points kept in memory) or `1m` (stored minute rollups).
    pub resolution: String,
    pub since: String,
    /// The latest sample, absent before the first one.
    pub latest: Option<LatestSample>,
    pub points: Points,
}

/// History points at the asked resolution.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Points {
    Raw(Vec<PointView>),
    Minute(Vec<MinutePoint>),
}

/// The latest sample with the inventory it refers to.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LatestSample {
    pub seq: u64,
    pub taken_at: String,
    pub received_at: String,
    /// CPU (total and per core), load, memory, swap, uptime.
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub host: HostSample,
    pub os: String,
    pub kernel: String,
    pub container_runtime: Option<String>,
    pub gpu_driver: Option<String>,
    pub disks: Vec<DiskView>,
    pub interfaces: Vec<InterfaceView>,
    pub gpus: Vec<GpuView>,
    pub containers: Vec<ContainerRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DiskView {
    pub mount: String,
    pub filesystem: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InterfaceView {
    pub name: String,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GpuView {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub power_limit_mw: Option<u32>,
    pub utilization_percent: Option<u8>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_c: Option<u8>,
    pub power_mw: Option<u32>,
    pub fan_percent: Option<u8>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub processes: Vec<GpuProcessView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GpuProcessView {
    pub pid: u32,
    pub name: String,
    pub memory_used_bytes: u64,
}

pub use super::containers::ContainerRow;

/// A history point kept in memory.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PointView {
    pub t: String,
    pub cpu_percent: f64,
    pub load1: f64,
    pub memory_used_bytes: u64,
    pub net_rx_bytes_per_sec: u64,
    pub net_tx_bytes_per_sec: u64,
    pub gpu_utilization_percent: Option<u8>,
    pub gpu_temperature_c: Option<u8>,
    pub gpu_memory_used_bytes: Option<u64>,
    pub containers_running: u16,
    pub containers_unhealthy: u16,
}

/// A stored minute: the average and the maximum of each figure.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MinutePoint {
    pub t: String,
    pub samples: i64,
    pub cpu_percent: Stat,
    pub memory_used_bytes: Stat,
    pub load1: Stat,
    pub net_rx_bytes_per_sec: Stat,
    pub net_tx_bytes_per_sec: Stat,
    pub gpu_utilization_percent: Option<Stat>,
    pub gpu_memory_used_bytes: Option<Stat>,
    pub gpu_temperature_c: Option<Stat>,
    pub containers_running: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Stat {
    pub avg: f64,
    pub max: f64,
}

impl From<(f64, f64)> for Stat {
    fn from((avg, max): (f64, f64)) -> Self {
        Stat { avg, max }
    }
}
