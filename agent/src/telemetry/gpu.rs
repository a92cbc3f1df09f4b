//! NVIDIA GPUs through NVML (nvml-wrapper): one library load per process, then cheap queries.
//! No NVML library means "no NVIDIA GPU", said once. A query that fails mid-run marks only that
//! field unavailable in that sample; the collector keeps going.

use nebula_protocol::telemetry::{GpuInfo, GpuProcess, GpuSample};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::{Device, Nvml};

pub struct GpuCollector {
    devices: Vec<Device<'static>>,
    nvml: Option<&'static Nvml>,
    driver: Option<String>,
    simulated: Vec<SimulatedGpu>,
}

/// A GPU with fixed readings, for the fleet simulator and tests on hosts without NVIDIA hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedGpu {
    pub info: GpuInfo,
    pub memory_used_bytes: u64,
    pub utilization_percent: u8,
}

impl std::fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCollector")
            .field("devices", &self.devices.len())
            .field("driver", &self.driver)
            .finish()
    }
}

impl GpuCollector {
    /// Load NVML once. Without it (no driver, no GPU, not Linux/Windows), the collector reports
    /// no GPUs and logs that once.
    pub fn new() -> Self {
        match Nvml::init() {
            Ok(nvml) => {
                // NVML lives for the whole process; leaking it lets devices borrow it for good.
                let nvml: &'static Nvml = Box::leak(Box::new(nvml));
                let count = nvml.device_count().unwrap_or(0);
                let devices: Vec<Device<'static>> = (0..count)
                    .filter_map(|i| nvml.device_by_index(i).ok())
                    .collect();
                let driver = nvml.sys_driver_version().ok();
                tracing::info!(gpus = devices.len(), driver = ?driver, "NVIDIA driver found (NVML)");
                GpuCollector {
                    devices,
                    nvml: Some(nvml),
                    driver,
                    simulated: Vec::new(),
                }
            }
            Err(e) => {
                tracing::info!("no NVIDIA GPU: NVML is not available ({e})");
                GpuCollector::none()
            }
        }
    }

    /// A collector that reports no GPUs (hosts without NVIDIA hardware, tests).
    pub fn none() -> Self {
        GpuCollector {
            devices: Vec::new(),
            nvml: None,
            driver: None,
            simulated: Vec::new(),
        }
    }

    /// A collector that reports these GPUs (no NVML involved).
    pub fn simulated(gpus: Vec<SimulatedGpu>) -> Self {
        GpuCollector {
            driver: (!gpus.is_empty()).then(|| "simulated".to_owned()),
            simulated: gpus,
            ..GpuCollector::none()
        }
    }

    pub fn driver(&self) -> Option<&str> {
        self.driver.as_deref()
    }

    pub fn count(&self) -> usize {
        self.devices.len() + self.simulated.len()
    }

    pub fn inventory(&self) -> Vec<GpuInfo> {
        if !self.simulated.is_empty() {
            return self.simulated.iter().map(|g| g.info.clone()).collect();
        }
        self.devices
            .iter()
            .map(|d| GpuInfo {
                uuid: d.uuid().unwrap_or_default(),
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
                power_limit_mw: d.enforced_power_limit().ok(),
            })
            .collect()
    }

    /// The four figures a fleet view needs, nothing else: utilisation, memory, temperature,
    /// power (what `nebula-bench gpu` compares against raw NVML).
    pub fn sample_core(&self) -> Vec<GpuSample> {
        self.devices
            .iter()
            .map(|d| GpuSample {
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu.min(100) as u8),
                memory_used_bytes: d.memory_info().ok().map(|m| m.used),
                temperature_c: d
                    .temperature(TemperatureSensor::Gpu)
                    .ok()
                    .map(|t| t.min(255) as u8),
                power_mw: d.power_usage().ok(),
                ..GpuSample::default()
            })
            .collect()
    }

    /// A full sample: the core figures plus fan, clocks and per-process memory.
    pub fn sample(&self) -> Vec<GpuSample> {
        if !self.simulated.is_empty() {
            return self
                .simulated
                .iter()
                .map(|g| GpuSample {
                    utilization_percent: Some(g.utilization_percent),
                    memory_used_bytes: Some(g.memory_used_bytes),
                    ..GpuSample::default()
                })
                .collect();
        }
        let mut out = self.sample_core();
        for (d, s) in self.devices.iter().zip(out.iter_mut()) {
            s.fan_percent = d.fan_speed(0).ok().map(|f| f.min(100) as u8);
            s.sm_clock_mhz = d.clock_info(Clock::SM).ok();
            s.memory_clock_mhz = d.clock_info(Clock::Memory).ok();
            s.processes = d
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .chain(d.running_graphics_processes().unwrap_or_default())
                .map(|p| GpuProcess {
                    pid: p.pid,
                    name: self.process_name(p.pid),
                    memory_used_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => b,
                        UsedGpuMemory::Unavailable => 0,
                    },
                })
                .collect();
        }
        out
    }

    fn process_name(&self, pid: u32) -> String {
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            return comm.trim().to_owned();
        }
        self.nvml
            .and_then(|n| n.sys_process_name(pid, 64).ok())
            .unwrap_or_default()
    }
}

impl Default for GpuCollector {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine has no NVIDIA driver: the collector must say "no GPU" and return empty
    /// samples, not errors. (On a GPU host this test checks the real path instead.)
    #[test]
    fn no_nvml_means_no_gpus_not_errors() {
        let c = GpuCollector::new();
        let has_driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
        if has_driver {
            assert!(c.count() > 0);
            assert_eq!(c.sample().len(), c.count());
        } else {
            assert_eq!(c.count(), 0);
            assert!(c.driver().is_none());
            assert!(c.inventory().is_empty());
            assert!(c.sample().is_empty());
        }
        let none = GpuCollector::none();
        assert!(none.sample_core().is_empty());
    }
}
