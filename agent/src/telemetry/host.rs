//! Host metrics from sysinfo. Only CPU, memory, disks and networks are refreshed per sample;
//! the process list is never walked (that costs milliseconds; this costs microseconds).

use std::time::Instant;

use nebula_protocol::telemetry::{DiskInfo, HostSample, NetRate};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

/// Filesystems that are views of other storage, not disks of their own.
const PSEUDO_FS: &[&str] = &[
    "overlay",
    "squashfs",
    "tmpfs",
    "devtmpfs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "nsfs",
    "fuse.lxcfs",
    "autofs",
    "ramfs",
    "efivarfs",
];

pub struct HostCollector {
    sys: System,
    disks: Disks,
    networks: Networks,
    last_net: Instant,
    samples: u64,
}

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector").finish_non_exhaustive()
    }
}

/// A disk or interface list as seen now (part of the telemetry inventory).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostInventory {
    pub disks: Vec<DiskInfo>,
    pub interfaces: Vec<String>,
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCollector {
    pub fn new() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::everything()),
        );
        HostCollector {
            sys,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            last_net: Instant::now(),
            samples: 0,
        }
    }

    fn keep_disk(d: &sysinfo::Disk) -> bool {
        let fs = d.file_system().to_string_lossy();
        d.total_space() > 0 && !PSEUDO_FS.contains(&fs.as_ref())
    }

    fn keep_iface(name: &str) -> bool {
        name != "lo" && !name.starts_with("veth")
    }

    /// Disks and interfaces in the order samples use. Re-lists them every 12th sample (once a
    /// minute at the default interval) to notice new mounts and interfaces.
    pub fn inventory(&mut self) -> HostInventory {
        if self.samples.is_multiple_of(12) {
            self.disks.refresh(true);
            self.networks.refresh(true);
            self.last_net = Instant::now();
        }
        let mut disks: Vec<DiskInfo> = self
            .disks
            .list()
            .iter()
            .filter(|d| Self::keep_disk(d))
            .map(|d| DiskInfo {
                mount: d.mount_point().to_string_lossy().into_owned(),
                filesystem: d.file_system().to_string_lossy().into_owned(),
                total_bytes: d.total_space(),
            })
            .collect();
        disks.sort_by(|a, b| a.mount.cmp(&b.mount));
        disks.dedup_by(|a, b| a.mount == b.mount);
        let mut interfaces: Vec<String> = self
            .networks
            .keys()
            .filter(|n| Self::keep_iface(n))
            .cloned()
            .collect();
        interfaces.sort();
        HostInventory { disks, interfaces }
    }

    /// Take one sample; `inv` fixes the order of disks and interfaces.
    pub fn sample(&mut self, inv: &HostInventory) -> (HostSample, Vec<u64>, Vec<NetRate>) {
        self.samples += 1;
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        self.disks.refresh(false);
        self.networks.refresh(false);
        let secs = self.last_net.elapsed().as_secs_f64().max(0.001);
        self.last_net = Instant::now();
        let load = System::load_average();
        let host = HostSample {
            cpu_percent: self.sys.global_cpu_usage(),
            per_core_percent: self.sys.cpus().iter().map(|c| c.cpu_usage()).collect(),
            load: [load.one as f32, load.five as f32, load.fifteen as f32],
            memory_used_bytes: self.sys.used_memory(),
            memory_total_bytes: self.sys.total_memory(),
            swap_used_bytes: self.sys.used_swap(),
            swap_total_bytes: self.sys.total_swap(),
            uptime_secs: System::uptime(),
        };
        let disks = inv
            .disks
            .iter()
            .map(|want| {
                self.disks
                    .list()
                    .iter()
                    .find(|d| d.mount_point().as_os_str() == want.mount.as_str())
                    .map(|d| d.total_space().saturating_sub(d.available_space()))
                    .unwrap_or(0)
            })
            .collect();
        let nets = inv
            .interfaces
            .iter()
            .map(|name| match self.networks.get(name) {
                Some(n) => NetRate {
                    rx_bytes_per_sec: (n.received() as f64 / secs) as u64,
                    tx_bytes_per_sec: (n.transmitted() as f64 / secs) as u64,
                },
                None => NetRate::default(),
            })
            .collect();
        (host, disks, nets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_host() {
        let mut c = HostCollector::new();
        let inv = c.inventory();
        std::thread::sleep(std::time::Duration::from_millis(250));
        let (host, disks, nets) = c.sample(&inv);
        assert!(host.memory_total_bytes > 0);
        assert!(host.memory_used_bytes <= host.memory_total_bytes);
        assert_eq!(
            host.per_core_percent.len(),
            std::thread::available_parallelism().unwrap().get()
        );
        assert!((0.0..=100.0).contains(&host.cpu_percent));
        assert_eq!(disks.len(), inv.disks.len());
        assert_eq!(nets.len(), inv.interfaces.len());
        assert!(host.uptime_secs > 0);
    }
}
