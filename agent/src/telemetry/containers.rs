//! Containers through the Docker Engine API (bollard): the container list every sample, stats
//! for running containers (concurrently), restart counts from inspect (cached, refreshed on
//! events), and the event stream so that a container that dies or turns unhealthy is reported
//! at once rather than at the next sample.
//!
//! No daemon means "no container runtime", logged once; the collector tries again every
//! [`RECONNECT_EVERY`] and says so when a daemon appears.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::query_parameters::{EventsOptions, ListContainersOptions, StatsOptions};
use bollard::Docker;
use futures::StreamExt;
use nebula_protocol::containers::ContainerDetail;
use nebula_protocol::deploy::{PortMapping, PortProtocol};
use nebula_protocol::telemetry::{ContainerHealth, ContainerInfo, ContainerSample, ContainerState};
use tokio::sync::mpsc;

use super::cgroup;
use tokio_util::sync::CancellationToken;

pub const RECONNECT_EVERY: Duration = Duration::from_secs(5);
/// Stats requests in flight at once.
const STATS_IN_FLIGHT: usize = 32;

/// A Docker event worth an immediate sample.
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub id: String,
    pub action: String,
}

pub struct ContainerCollector {
    /// The runtime's socket from the agent's config (`None`: look for one).
    socket: Option<String>,
    docker: Option<Docker>,
    runtime: Option<String>,
    said_missing: bool,
    last_attempt: Option<Instant>,
    prev_cpu: HashMap<String, (u64, u64)>,
    /// Per container: restart count, init PID and start time, from inspect (refreshed on
    /// events).
    restarts: HashMap<String, Inspected>,
    /// Where the kernel keeps container cgroups, when readable (the fast path).
    cgroups: Option<cgroup::Layout>,
    /// Previous cgroup CPU reading per container: (CPU ns, when).
    prev_cgroup_cpu: HashMap<String, (u64, Instant)>,
    /// Each container's cgroup directories, found once.
    cgroup_dirs: HashMap<String, cgroup::Dirs>,
    /// The container list as last read, and when. Events mark it stale; otherwise it is read
    /// again every [`RESYNC_EVERY`] (in case an event was missed).
    rows: Vec<Row>,
    listed_at: Option<Instant>,
    /// An event was seen: the list read right after it is read once more at the next sample
    /// (some daemons, Docker 20.10 among them, send `die` before the container's state says
    /// it stopped, so the first read can still say running).
    confirm: bool,
    /// Lists that failed in a row: one failure (a daemon slow to answer under load) keeps
    /// the last list; the next one means the runtime is gone.
    list_failures: u32,
}

/// A container as listed: what the inventory says of it, its state and health, and its
/// published ports.
type Row = (
    ContainerInfo,
    ContainerState,
    ContainerHealth,
    Vec<PortMapping>,
);

/// What inspect says that the list does not.
#[derive(Debug, Clone, Copy)]
struct Inspected {
    restarts: u32,
    pid: u32,
    started_unix_ms: Option<i64>,
}

/// How long a container list is trusted without an event saying it changed.
const RESYNC_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for ContainerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCollector")
            .field("runtime", &self.runtime)
            .finish()
    }
}

impl ContainerCollector {
    pub fn new(socket: Option<String>) -> Self {
        ContainerCollector {
            socket,
            docker: None,
            runtime: None,
            said_missing: false,
            last_attempt: None,
            prev_cpu: HashMap::new(),
            restarts: HashMap::new(),
            cgroups: cgroup::Layout::detect(),
            prev_cgroup_cpu: HashMap::new(),
            cgroup_dirs: HashMap::new(),
            rows: Vec::new(),
            listed_at: None,
            confirm: false,
            list_failures: 0,
        }
    }

    /// `docker <version>` when a daemon is reachable.
    pub fn runtime(&self) -> Option<&str> {
        self.runtime.as_deref()
    }

    /// Connect if not connected and the last attempt is old enough. Returns a client for the
    /// event follower when a connection was made just now.
    pub async fn ensure_connected(&mut self) -> Option<Docker> {
        if self.docker.is_some() {
            return None;
        }
        if self
            .last_attempt
            .is_some_and(|t| t.elapsed() < RECONNECT_EVERY)
        {
            return None;
        }
        self.last_attempt = Some(Instant::now());
        match connect(self.socket.as_deref()).await {
            Ok((docker, version)) => {
                tracing::info!(%version, "container runtime found");
                self.runtime = Some(version.clone());
                self.docker = Some(docker.clone());
                self.said_missing = false;
                Some(docker)
            }
            Err(e) => {
                if !self.said_missing {
                    tracing::info!("no container runtime: {e}");
                    self.said_missing = true;
                }
                None
            }
        }
    }

    fn lost(&mut self, e: &bollard::errors::Error) {
        tracing::warn!("container runtime went away: {e}");
        self.docker = None;
        self.runtime = None;
        self.said_missing = true;
        self.list_failures = 0;
        self.rows.clear();
        self.prev_cpu.clear();
        self.restarts.clear();
        self.prev_cgroup_cpu.clear();
        self.listed_at = None;
    }

    /// Forget what an event makes stale (restart counts).
    pub fn on_event(&mut self, ev: &ContainerEvent) {
        self.restarts.remove(&ev.id);
        self.listed_at = None;
        self.confirm = true;
    }

    /// Every container (running or not), sorted by name, with a sample and details for each.
    pub async fn collect(
        &mut self,
    ) -> (
        Vec<ContainerInfo>,
        Vec<ContainerSample>,
        Vec<ContainerDetail>,
    ) {
        let Some(docker) = self.docker.clone() else {
            return (Vec::new(), Vec::new(), Vec::new());
        };
        if self.listed_at.is_none_or(|t| t.elapsed() >= RESYNC_EVERY) {
            match self.list(&docker).await {
                Ok(rows) => {
                    self.list_failures = 0;
                    self.rows = rows;
                    // After an event, the next sample reads the list again.
                    self.listed_at = (!std::mem::take(&mut self.confirm)).then(Instant::now);
                }
                Err(e) if self.list_failures == 0 && !self.rows.is_empty() => {
                    // Containers do not vanish because one answer was slow: the last list
                    // stands until the next sample asks again.
                    self.list_failures = 1;
                    tracing::warn!("listing containers failed; keeping the last list: {e}");
                }
                Err(e) => {
                    self.lost(&e);
                    return (Vec::new(), Vec::new(), Vec::new());
                }
            }
        }
        let rows = self.rows.clone();
        self.sample_rows(&docker, rows).await
    }

    /// Every container with its state and health, sorted by name.
    async fn list(&self, docker: &Docker) -> Result<Vec<Row>, bollard::errors::Error> {
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await?;
        let mut rows: Vec<Row> = list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_else(|| id.chars().take(12).collect());
                let state = c
                    .state
                    .map(|s| ContainerState::parse(s.as_ref()))
                    .unwrap_or_default();
                let health = c
                    .health
                    .and_then(|h| h.status)
                    .map(|s| ContainerHealth::parse(s.as_ref()))
                    .unwrap_or_else(|| health_from_status(c.status.as_deref().unwrap_or("")));
                let labels: BTreeMap<String, String> =
                    c.labels.unwrap_or_default().into_iter().collect();
                let mut ports: Vec<PortMapping> = c
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| PortMapping {
                        host_ip: p.ip.filter(|ip| !ip.is_empty()),
                        host_port: p.public_port,
                        container_port: p.private_port,
                        protocol: match p.typ {
                            Some(bollard::models::PortSummaryTypeEnum::UDP) => PortProtocol::Udp,
                            _ => PortProtocol::Tcp,
                        },
                    })
                    .collect();
                ports.sort();
                ports.dedup();
                Some((
                    ContainerInfo {
                        id,
                        name,
                        image: c.image.unwrap_or_default(),
                        labels,
                        created_unix: c.created.unwrap_or(0),
                    },
                    state,
                    health,
                    ports,
                ))
            })
            .collect();
        rows.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(rows)
    }

    /// Restart counts, PIDs and start times: inspect only containers we have none for.
    async fn inspect_new(&mut self, docker: &Docker, rows: &[Row]) {
        for (info, ..) in rows {
            if !self.restarts.contains_key(&info.id) {
                if let Ok(i) = docker.inspect_container(&info.id, None).await {
                    let restarts = i.restart_count.unwrap_or(0).clamp(0, u32::MAX as i64) as u32;
                    let pid = i
                        .state
                        .as_ref()
                        .and_then(|s| s.pid)
                        .unwrap_or(0)
                        .clamp(0, u32::MAX as i64) as u32;
                    let started_unix_ms = i
                        .state
                        .and_then(|s| s.started_at)
                        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as i64)
                        .filter(|ms| *ms > 0);
                    self.restarts.insert(
                        info.id.clone(),
                        Inspected {
                            restarts,
                            pid,
                            started_unix_ms,
                        },
                    );
                }
            }
        }
    }

    async fn sample_rows(
        &mut self,
        docker: &Docker,
        rows: Vec<Row>,
    ) -> (
        Vec<ContainerInfo>,
        Vec<ContainerSample>,
        Vec<ContainerDetail>,
    ) {
        self.inspect_new(docker, &rows).await;
        // The daemon's stats API for the rest (its one-shot answers take up to a second each,
        // so they run together).
        // Fast path first: the kernel's own counters for running containers.
        let now = Instant::now();
        let mut from_kernel: HashMap<String, ContainerSample> = HashMap::new();
        if let Some(layout) = &self.cgroups {
            for (info, state, ..) in &rows {
                if *state != ContainerState::Running {
                    continue;
                }
                let dirs = match self.cgroup_dirs.get(&info.id) {
                    Some(d) => d.clone(),
                    None => match layout.locate(&info.id) {
                        Some(d) => {
                            self.cgroup_dirs.insert(info.id.clone(), d.clone());
                            d
                        }
                        None => continue,
                    },
                };
                let Some(c) = dirs.read() else {
                    self.cgroup_dirs.remove(&info.id);
                    continue;
                };
                let mut s = ContainerSample {
                    memory_used_bytes: Some(c.memory_used),
                    memory_limit_bytes: c.memory_limit,
                    ..ContainerSample::default()
                };
                if let Some((prev_ns, at)) = self
                    .prev_cgroup_cpu
                    .insert(info.id.clone(), (c.cpu_ns, now))
                {
                    let wall = now.duration_since(at).as_nanos() as f64;
                    if wall > 0.0 {
                        s.cpu_percent =
                            Some((c.cpu_ns.saturating_sub(prev_ns) as f64 / wall * 100.0) as f32);
                    }
                }
                let pid = self.restarts.get(&info.id).map(|r| r.pid).unwrap_or(0);
                if let Some((rx, tx)) = (pid > 0).then(|| cgroup::net_bytes(pid)).flatten() {
                    s.net_rx_bytes = Some(rx);
                    s.net_tx_bytes = Some(tx);
                }
                from_kernel.insert(info.id.clone(), s);
            }
        }
        let wanted: Vec<(String, bool)> = rows
            .iter()
            .map(|(info, state, ..)| {
                (
                    info.id.clone(),
                    *state == ContainerState::Running && !from_kernel.contains_key(&info.id),
                )
            })
            .collect();
        let mut stats = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(STATS_IN_FLIGHT) {
            let batch = chunk
                .iter()
                .map(|(id, running)| stats_once(docker.clone(), id.clone(), *running));
            stats.extend(futures::future::join_all(batch).await);
        }

        let live: std::collections::HashSet<&str> = rows.iter().map(|r| r.0.id.as_str()).collect();
        self.prev_cpu.retain(|id, _| live.contains(id.as_str()));
        self.restarts.retain(|id, _| live.contains(id.as_str()));
        self.cgroup_dirs.retain(|id, _| live.contains(id.as_str()));
        self.prev_cgroup_cpu
            .retain(|id, _| live.contains(id.as_str()));
        let mut infos = Vec::with_capacity(rows.len());
        let mut samples = Vec::with_capacity(rows.len());
        let mut details = Vec::with_capacity(rows.len());
        for ((info, state, health, ports), st) in rows.into_iter().zip(stats) {
            let mut s = from_kernel.remove(&info.id).unwrap_or_default();
            s.state = state;
            s.health = health;
            let inspected = self.restarts.get(&info.id);
            s.restart_count = inspected.map(|r| r.restarts).unwrap_or(0);
            details.push(ContainerDetail {
                started_unix_ms: inspected.and_then(|r| r.started_unix_ms),
                ports,
            });
            if let Some(st) = st {
                let cpu = st.cpu_stats.as_ref();
                let total = cpu
                    .and_then(|c| c.cpu_usage.as_ref())
                    .and_then(|u| u.total_usage);
                let system = cpu.and_then(|c| c.system_cpu_usage);
                let cpus = cpu.and_then(|c| c.online_cpus).unwrap_or(1).max(1);
                if let (Some(total), Some(system)) = (total, system) {
                    if let Some((pt, ps)) = self.prev_cpu.insert(info.id.clone(), (total, system)) {
                        let dt = total.saturating_sub(pt) as f64;
                        let ds = system.saturating_sub(ps) as f64;
                        if ds > 0.0 {
                            s.cpu_percent = Some((dt / ds * f64::from(cpus) * 100.0) as f32);
                        }
                    }
                }
                if let Some(m) = st.memory_stats.as_ref() {
                    if let Some(usage) = m.usage {
                        let inactive = m
                            .stats
                            .as_ref()
                            .and_then(|s| {
                                s.get("inactive_file")
                                    .or_else(|| s.get("total_inactive_file"))
                                    .or_else(|| s.get("cache"))
                            })
                            .copied()
                            .unwrap_or(0);
                        s.memory_used_bytes = Some(usage.saturating_sub(inactive.min(usage)));
                    }
                    s.memory_limit_bytes = m.limit.filter(|l| *l > 0 && *l < u64::MAX / 2);
                }
                if let Some(nets) = st.networks.as_ref() {
                    s.net_rx_bytes = Some(nets.values().filter_map(|n| n.rx_bytes).sum());
                    s.net_tx_bytes = Some(nets.values().filter_map(|n| n.tx_bytes).sum());
                }
            }
            infos.push(info);
            samples.push(s);
        }
        (infos, samples, details)
    }
}

/// One stats reading (one-shot: the daemon answers at once, without its own 1 s sampling).
async fn stats_once(
    docker: Docker,
    id: String,
    running: bool,
) -> Option<bollard::models::ContainerStatsResponse> {
    if !running {
        return None;
    }
    docker
        .stats(
            &id,
            Some(StatsOptions {
                stream: false,
                one_shot: true,
            }),
        )
        .next()
        .await
        .and_then(Result::ok)
}

/// Older daemons put health only in the status text: "Up 2 minutes (healthy)".
fn health_from_status(status: &str) -> ContainerHealth {
    if status.contains("(healthy)") {
        ContainerHealth::Healthy
    } else if status.contains("(unhealthy)") {
        ContainerHealth::Unhealthy
    } else if status.contains("(health: starting)") {
        ContainerHealth::Starting
    } else {
        ContainerHealth::None
    }
}

async fn connect(socket: Option<&str>) -> Result<(Docker, String), bollard::errors::Error> {
    let docker = crate::docker::connect(socket)?;
    let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
        .await
        .map_err(|_| bollard::errors::Error::RequestTimeoutError)??;
    let version = docker.version().await?;
    Ok((docker, crate::docker::runtime_name(&version)))
}

/// Follow the daemon's container events and forward those that change what we report. Ends
/// when the stream ends (daemon gone) or on shutdown.
pub async fn follow_events(
    docker: Docker,
    tx: mpsc::Sender<ContainerEvent>,
    shutdown: CancellationToken,
) {
    let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.next() => ev,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                tracing::debug!("docker event stream failed: {e}");
                return;
            }
            None => {
                tracing::debug!("docker event stream ended");
                return;
            }
        };
        let action = ev.action.unwrap_or_default();
        let relevant = matches!(
            action.split(':').next().unwrap_or(""),
            "create"
                | "start"
                | "restart"
                | "die"
                | "stop"
                | "kill"
                | "oom"
                | "destroy"
                | "pause"
                | "unpause"
                | "rename"
                | "health_status"
        );
        if !relevant {
            continue;
        }
        let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
        // A full channel already holds a pending trigger; dropping this one loses nothing.
        let _ = tx.try_send(ContainerEvent { id, action });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_read_from_old_style_status_text() {
        assert_eq!(
            health_from_status("Up 3 minutes (healthy)"),
            ContainerHealth::Healthy
        );
        assert_eq!(
            health_from_status("Up 1 second (health: starting)"),
            ContainerHealth::Starting
        );
        assert_eq!(
            health_from_status("Up 9 minutes (unhealthy)"),
            ContainerHealth::Unhealthy
        );
        assert_eq!(
            health_from_status("Exited (0) 2 hours ago"),
            ContainerHealth::None
        );
    }
}
