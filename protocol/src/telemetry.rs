//! Telemetry: what an agent reports about its host, GPUs and containers.
//!
//! To keep samples small enough for a QUIC datagram, names and other slow-changing strings are
//! sent once per change in a [`TelemetryInventory`] (on the reliable session stream), and every
//! [`TelemetrySample`] carries only numbers, in the inventory's order, tagged with the inventory's
//! `epoch`. A sample whose epoch the controller has not seen yet is dropped and counted (the
//! inventory always precedes it on a working session, so this only happens in a race at start).

use serde::{Deserialize, Serialize};

use crate::Labels;

/// Slow-changing, string-heavy facts that samples refer to by position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryInventory {
    /// Bumped by the agent whenever anything below changes.
    pub epoch: u32,
    pub disks: Vec<DiskInfo>,
    pub interfaces: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub containers: Vec<ContainerInfo>,
    /// `None`: no container runtime reachable.
    pub container_runtime: Option<String>,
    /// `None`: no NVIDIA driver (NVML) on this host.
    pub gpu_driver: Option<String>,
    pub os: String,
    pub kernel: String,
    /// AI models on this host's inference backends (on disk, and whether loaded).
    pub models: Vec<ModelInfo>,
}

/// A model an inference backend on the node has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// Which backend holds it (`ollama`, `llama.cpp`, ...).
    pub backend: String,
    /// Loaded into memory (VRAM or RAM) right now.
    pub loaded: bool,
    pub size_bytes: u64,
    pub vram_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub mount: String,
    pub filesystem: String,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    /// Milliwatts; `None` when the GPU does not report it.
    pub power_limit_mw: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: Labels,
    pub created_unix: i64,
}

/// One periodic sample. Vectors follow the inventory's order (`disks`, `interfaces`, `gpus`,
/// `containers`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetrySample {
    pub epoch: u32,
    pub seq: u64,
    /// Unix milliseconds when the sample was taken.
    pub taken_at_ms: u64,
    pub host: HostSample,
    pub disks_used_bytes: Vec<u64>,
    pub interfaces: Vec<NetRate>,
    pub gpus: Vec<GpuSample>,
    pub containers: Vec<ContainerSample>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSample {
    /// Percent of all CPUs, 0-100.
    pub cpu_percent: f32,
    /// Percent per core, 0-100.
    pub per_core_percent: Vec<f32>,
    pub load: [f32; 3],
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub swap_total_bytes: u64,
    pub uptime_secs: u64,
}

/// Bytes per second since the previous sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRate {
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
}

/// A GPU reading. Every field is optional: a query that fails marks only that field unavailable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub utilization_percent: Option<u8>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_c: Option<u8>,
    pub power_mw: Option<u32>,
    pub fan_percent: Option<u8>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub name: String,
    pub memory_used_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    #[default]
    Unknown,
}

impl ContainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Restarting => "restarting",
            ContainerState::Removing => "removing",
            ContainerState::Exited => "exited",
            ContainerState::Dead => "dead",
            ContainerState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "created" => ContainerState::Created,
            "running" => ContainerState::Running,
            "paused" => ContainerState::Paused,
            "restarting" => ContainerState::Restarting,
            "removing" => ContainerState::Removing,
            "exited" => ContainerState::Exited,
            "dead" => ContainerState::Dead,
            _ => ContainerState::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerHealth {
    /// No health check configured.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl ContainerHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerHealth::None => "none",
            ContainerHealth::Starting => "starting",
            ContainerHealth::Healthy => "healthy",
            ContainerHealth::Unhealthy => "unhealthy",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "starting" => ContainerHealth::Starting,
            "healthy" => ContainerHealth::Healthy,
            "unhealthy" => ContainerHealth::Unhealthy,
            _ => ContainerHealth::None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSample {
    pub state: ContainerState,
    pub health: ContainerHealth,
    pub restart_count: u32,
    /// Percent of one CPU (may exceed 100 on several cores); `None` when not running.
    pub cpu_percent: Option<f32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
}

/// What travels as one QUIC datagram (no length prefix: a datagram is its own frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Datagram {
    Sample(TelemetrySample),
}

impl crate::Message for Datagram {
    const NAME: &'static str = "Datagram";
    const VARIANTS: Option<u32> = Some(1);
}
