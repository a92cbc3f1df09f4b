//! Host metrics from sysinfo. Only CPU and memory are refreshed every sample; disk space every
//! sixth sample and only for the disks reported; the process list is never walked (that costs
//! milliseconds; this costs microseconds). On Linux, network counters come from one read of
//! `/proc/net/dev` instead of several files per interface (container hosts have a veth per
//! container).

use std::time::Instant;

use nebula_protocol::telemetry::{DiskInfo, HostSample, NetRate};
use sysinfo::{
    CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};

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
    /// Previous counters (rx, tx) per interface, for rates.
    prev_net: std::collections::HashMap<String, (u64, u64)>,
    /// Disks and interfaces as last listed (re-listed every 12th sample).
    inventory: HostInventory,
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
            prev_net: Default::default(),
            inventory: HostInventory::default(),
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
        if !self.samples.is_multiple_of(12) {
            return self.inventory.clone();
        }
        self.disks.refresh(true);
        if !cfg!(target_os = "linux") {
            self.networks.refresh(true);
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
        let names: Vec<String> = match proc_net_dev() {
            Some(counters) => counters.into_iter().map(|(n, _)| n).collect(),
            None => self.networks.keys().cloned().collect(),
        };
        let mut interfaces: Vec<String> =
            names.into_iter().filter(|n| Self::keep_iface(n)).collect();
        interfaces.sort();
        self.inventory = HostInventory { disks, interfaces };
        self.inventory.clone()
    }

    /// Take one sample; `inv` fixes the order of disks and interfaces.
    pub fn sample(&mut self, inv: &HostInventory) -> (HostSample, Vec<u64>, Vec<NetRate>) {
        self.samples += 1;
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        if self.samples % 6 == 1 {
            for d in self.disks.list_mut() {
                if inv
                    .disks
                    .iter()
                    .any(|w| d.mount_point().as_os_str() == w.mount.as_str())
                {
                    d.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                }
            }
        }
        let secs = self.last_net.elapsed().as_secs_f64().max(0.001);
        self.last_net = Instant::now();
        let counters: Vec<(String, (u64, u64))> = match proc_net_dev() {
            Some(c) => c,
            None => {
                self.networks.refresh(false);
                // sysinfo reports deltas since its last refresh; turn them into running totals.
                self.networks
                    .iter()
                    .map(|(name, n)| {
                        let (rx, tx) = self.prev_net.get(name).copied().unwrap_or((0, 0));
                        (name.clone(), (rx + n.received(), tx + n.transmitted()))
                    })
                    .collect()
            }
        };
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
            .map(|name| {
                let now = counters.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
                match (now, self.prev_net.get(name)) {
                    (Some((rx, tx)), Some(&(prx, ptx))) => NetRate {
                        rx_bytes_per_sec: (rx.saturating_sub(prx) as f64 / secs) as u64,
                        tx_bytes_per_sec: (tx.saturating_sub(ptx) as f64 / secs) as u64,
                    },
                    _ => NetRate::default(),
                }
            })
            .collect();
        self.prev_net = counters.into_iter().collect();
        (host, disks, nets)
    }
}

/// `(interface, (rx bytes, tx bytes))` from `/proc/net/dev`, or `None` where it does not exist.
fn proc_net_dev() -> Option<Vec<(String, (u64, u64))>> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    Some(parse_net_dev(&text))
}

fn parse_net_dev(text: &str) -> Vec<(String, (u64, u64))> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // Receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes ...
            Some((name.trim().to_owned(), (*f.first()?, *f.get(8)?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0
  eth0: 98765432  54321    0    0    0     0          0        12 1234567   4321    0    0    0     0       0          0
";
        let v = parse_net_dev(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1], ("eth0".to_owned(), (98765432, 1234567)));
    }

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
