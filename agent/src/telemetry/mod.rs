//! Telemetry collection: one task samples host, GPUs and containers every interval (set by the
//! controller in `Welcome`) and at once when Docker reports a container event.
//!
//! Tasks and channels:
//! * [`run`] owns the collectors. It publishes the latest [`TelemetryInventory`] and the latest
//!   [`TelemetrySample`] on two `watch` channels (latest wins: a slow or absent session never
//!   makes samples pile up) and reads the interval from a third.
//! * [`containers::follow_events`] runs while a Docker daemon is connected and feeds a small
//!   bounded `mpsc` channel of container events back into [`run`].
//!
//! The session task reads both `watch` channels and sends the inventory on the session stream
//! and samples as QUIC datagrams.

use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::containers::ContainerDetails;
use nebula_protocol::telemetry::{TelemetryInventory, TelemetrySample};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod cgroup;
pub mod containers;
pub mod gpu;
pub mod host;

/// What the session sends when it changes: the telemetry inventory, and the details of its
/// containers under the same epoch (for controllers from 1.6 on).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    pub telemetry: TelemetryInventory,
    pub details: ContainerDetails,
}

impl std::ops::Deref for Inventory {
    type Target = TelemetryInventory;

    fn deref(&self) -> &TelemetryInventory {
        &self.telemetry
    }
}

/// The receiving ends the session reads.
#[derive(Debug, Clone)]
pub struct TelemetryFeed {
    pub inventory: watch::Receiver<Arc<Inventory>>,
    pub samples: watch::Receiver<Option<Arc<TelemetrySample>>>,
    pub interval: watch::Sender<Duration>,
}

/// Sending ends owned by [`run`].
#[derive(Debug)]
pub struct TelemetrySink {
    inventory: watch::Sender<Arc<Inventory>>,
    samples: watch::Sender<Option<Arc<TelemetrySample>>>,
    interval: watch::Receiver<Duration>,
}

pub fn channels(interval: Duration) -> (TelemetrySink, TelemetryFeed) {
    let (inv_tx, inv_rx) = watch::channel(Arc::new(Inventory::default()));
    let (s_tx, s_rx) = watch::channel(None);
    let (i_tx, i_rx) = watch::channel(interval);
    (
        TelemetrySink {
            inventory: inv_tx,
            samples: s_tx,
            interval: i_rx,
        },
        TelemetryFeed {
            inventory: inv_rx,
            samples: s_rx,
            interval: i_tx,
        },
    )
}

/// The collectors and the state that numbers samples and inventories.
pub struct Collectors {
    pub host: host::HostCollector,
    pub gpu: gpu::GpuCollector,
    pub containers: containers::ContainerCollector,
    inventory: Inventory,
    seq: u64,
    os: String,
    kernel: String,
    /// Models reported in the inventory.
    pub models: Vec<nebula_protocol::telemetry::ModelInfo>,
}

impl std::fmt::Debug for Collectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collectors")
            .field("seq", &self.seq)
            .finish()
    }
}

impl Collectors {
    /// `docker_socket`: the container runtime's socket from the agent's config (`None`: look
    /// for one).
    pub fn new(gpu: gpu::GpuCollector, docker_socket: Option<String>) -> Self {
        let os = format!(
            "{} {}",
            sysinfo::System::name().unwrap_or_default(),
            sysinfo::System::os_version().unwrap_or_default()
        )
        .trim()
        .to_owned();
        Collectors {
            host: host::HostCollector::new(),
            gpu,
            containers: containers::ContainerCollector::new(docker_socket),
            inventory: Inventory::default(),
            seq: 0,
            os,
            kernel: sysinfo::System::kernel_version().unwrap_or_default(),
            models: Vec::new(),
        }
    }

    /// Take a sample. Returns a new inventory too when anything it lists changed.
    pub async fn collect(&mut self) -> (Option<Inventory>, TelemetrySample) {
        let host_inv = self.host.inventory();
        let (containers, container_samples, details) = self.containers.collect().await;
        let (host, disks, nets) = self.host.sample(&host_inv);
        let gpus = self.gpu.sample();
        let mut inv = TelemetryInventory {
            epoch: self.inventory.epoch,
            disks: host_inv.disks,
            interfaces: host_inv.interfaces,
            gpus: self.gpu.inventory(),
            containers,
            container_runtime: self.containers.runtime().map(str::to_owned),
            gpu_driver: self.gpu.driver().map(str::to_owned),
            os: self.os.clone(),
            kernel: self.kernel.clone(),
            models: self.models.clone(),
        };
        let changed = inv != self.inventory.telemetry
            || details != self.inventory.details.containers
            || self.seq == 0;
        if changed {
            inv.epoch = self.inventory.epoch.wrapping_add(1);
            self.inventory = Inventory {
                details: ContainerDetails {
                    epoch: inv.epoch,
                    containers: details,
                },
                telemetry: inv,
            };
        }
        self.seq += 1;
        let sample = TelemetrySample {
            epoch: self.inventory.epoch,
            seq: self.seq,
            taken_at_ms: nebula_protocol::time::UnixMillis::now().as_u64(),
            host,
            disks_used_bytes: disks,
            interfaces: nets,
            gpus,
            containers: container_samples,
        };
        (changed.then(|| self.inventory.clone()), sample)
    }
}

/// How soon after an event-triggered sample the confirming one follows.
const CONFIRM_AFTER_EVENT: Duration = Duration::from_millis(700);

/// Sample until `shutdown`: every interval, and right away (within ~50 ms) after a container
/// event.
pub async fn run(
    mut collectors: Collectors,
    sink: TelemetrySink,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel::<containers::ContainerEvent>(64);
    let mut interval = sink.interval.clone();
    // After a sample that an event triggered, the next one comes soon: it confirms what the
    // event changed (see `ContainerCollector::on_event`).
    let mut confirm = false;
    loop {
        if let Some(docker) = collectors.containers.ensure_connected().await {
            tracker.spawn(containers::follow_events(
                docker,
                ev_tx.clone(),
                shutdown.clone(),
            ));
        }
        let (inv, sample) = collectors.collect().await;
        if let Some(inv) = inv {
            sink.inventory.send_replace(Arc::new(inv));
        }
        sink.samples.send_replace(Some(Arc::new(sample)));
        let mut period = *interval.borrow_and_update();
        if std::mem::take(&mut confirm) {
            period = period.min(CONFIRM_AFTER_EVENT);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = interval.changed() => {}
            ev = ev_rx.recv() => {
                if let Some(ev) = ev {
                    collectors.containers.on_event(&ev);
                    // Let a burst of events (stop = kill + die + stop) settle into one sample.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while let Ok(ev) = ev_rx.try_recv() {
                        collectors.containers.on_event(&ev);
                    }
                    confirm = true;
                }
            }
        }
    }
}
