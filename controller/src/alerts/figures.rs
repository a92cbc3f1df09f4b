//! A node's figures as threshold rules read them: averages over a window of the telemetry
//! history (CPU, memory, load per core, hottest GPU, GPU utilisation and memory), with a
//! minimum number of samples; the fullest filesystem from the latest sample.

use nebula_desired::map::monitors::Metric;

use crate::store::NodeRecord;
use crate::telemetry::{HistoryPoint, NodeView};

const MIB: f64 = 1024.0 * 1024.0;
/// A GPU figure the agent did not have.
const NO_GPU_FIGURE: u8 = 255;

pub(crate) struct Figures<'a> {
    hist: &'a [HistoryPoint],
    cores: f64,
    memory_total_mib: Option<f64>,
    vram_total_mib: Option<f64>,
    disk_percent: Option<f64>,
}

impl<'a> Figures<'a> {
    pub fn new(n: &NodeRecord, view: Option<&NodeView>, hist: &'a [HistoryPoint]) -> Self {
        let inv = view.and_then(|v| v.inventory.as_ref());
        let latest = view.and_then(|v| v.latest.as_ref());
        let memory_total_mib = latest
            .map(|s| s.host.memory_total_bytes as f64 / MIB)
            .filter(|t| *t > 0.0);
        let vram_total_mib = inv
            .map(|i| {
                i.gpus
                    .iter()
                    .map(|g| g.memory_total_bytes as f64)
                    .sum::<f64>()
                    / MIB
            })
            .filter(|t| *t > 0.0);
        let disk_percent = match (inv, latest) {
            (Some(i), Some(s)) if i.epoch == s.epoch => i
                .disks
                .iter()
                .zip(&s.disks_used_bytes)
                .filter(|(d, _)| d.total_bytes > 0)
                .map(|(d, used)| *used as f64 * 100.0 / d.total_bytes as f64)
                .reduce(f64::max),
            _ => None,
        };
        Figures {
            hist,
            cores: f64::from(n.facts.cpu_count.max(1)),
            memory_total_mib,
            vram_total_mib,
            disk_percent,
        }
    }

    /// The metric's average over the points from `from` (Unix seconds) on, when at least
    /// `min_samples` had it; the disk's latest figure.
    pub fn average(&self, metric: Metric, from: u32, min_samples: usize) -> Option<f64> {
        if metric == Metric::Disk {
            return self.disk_percent;
        }
        let value = |p: &HistoryPoint| -> Option<f64> {
            match metric {
                Metric::Cpu => Some(f64::from(p.cpu) / 100.0),
                Metric::Memory => Some(f64::from(p.mem_used_mib) * 100.0 / self.memory_total_mib?),
                Metric::Load => Some(f64::from(p.load1) / 100.0 / self.cores),
                Metric::GpuTemperature => {
                    (p.gpu_temp != NO_GPU_FIGURE).then_some(f64::from(p.gpu_temp))
                }
                Metric::GpuUtilization => {
                    (p.gpu_util != NO_GPU_FIGURE).then_some(f64::from(p.gpu_util))
                }
                Metric::Vram => Some(f64::from(p.gpu_mem_used_mib) * 100.0 / self.vram_total_mib?),
                Metric::Disk => None,
            }
        };
        let start = self.hist.partition_point(|p| p.t < from);
        let (sum, n) = self.hist[start..]
            .iter()
            .filter_map(value)
            .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
        (n >= min_samples.max(1)).then(|| sum / n as f64)
    }
}
