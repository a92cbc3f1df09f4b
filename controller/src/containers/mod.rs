//! Containers across the fleet: every container as telemetry reports it, one container with
//! what its node's `[docker]` policy allows, actions on it (as `container` jobs), and its log
//! followed live from the agent.
//!
//! A log follower is a QUIC stream to the agent ([`JobControl::Logs`]) read by one task per
//! client. Memory is bounded at each hop: the agent holds one batch, the stream at most its
//! receive window (1 MiB), and the reader hands batches on through a channel of
//! [`FOLLOW_BUFFER`] batches; when the client reads slowly, the channel fills, the reader stops
//! reading the stream, QUIC flow control stops the agent, and the agent stops reading the
//! runtime's log (which the runtime keeps on disk). At most [`MAX_LOG_FOLLOWERS`] run at once.
//!
//! [`JobControl::Logs`]: nebula_protocol::jobs::JobControl::Logs

use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::containers::{
    valid_container_ref, ContainerAction, ContainerDetail, LogEntry, LogEvent, LogsRequest,
    PolicyKey,
};
use nebula_protocol::deploy::labels;
use nebula_protocol::jobs::JobControl;
use nebula_protocol::telemetry::{ContainerInfo, ContainerSample};
use nebula_protocol::{self as proto, FrameReader};
pub use nebula_types::api::containers::{ContainerRow, ContainerView, DockerPolicyView};
use nebula_types::jobs::{ContainerActionKind, JobRecord, Target, Work};
use uuid::Uuid;

pub mod exec;
pub mod storage;

use crate::authz::{Change, Op, OpCtx};
use crate::jobs::NewJob;
use crate::{ControlPlane, OpError};

/// Log followers served at once by this controller.
pub const MAX_LOG_FOLLOWERS: usize = 256;
/// Batches a follower holds for its client (each at most
/// [`nebula_protocol::containers::LOG_BATCH_BYTES`] of lines).
pub const FOLLOW_BUFFER: usize = 8;
/// Largest frame read from a log stream: a batch, with room for its encoding.
const MAX_LOG_FRAME: usize = 1024 * 1024;

/// Which containers to list.
#[derive(Debug, Clone, Default)]
pub struct ContainerFilter {
    pub node: Option<String>,
    /// `key`, `value`.
    pub label: Option<(String, String)>,
    pub state: Option<String>,
    pub health: Option<String>,
    pub managed: Option<bool>,
    /// Case-insensitive, in the node, name, image and service.
    pub search: Option<String>,
}

impl ContainerFilter {
    fn keeps(&self, row: &ContainerRow) -> bool {
        if self.state.as_deref().is_some_and(|s| s != row.state)
            || self.health.as_deref().is_some_and(|h| h != row.health)
            || self.managed.is_some_and(|m| m != row.managed)
        {
            return false;
        }
        if let Some((k, v)) = &self.label {
            if row.labels.get(k) != Some(v) {
                return false;
            }
        }
        if let Some(q) = self.search.as_deref().filter(|q| !q.is_empty()) {
            let q = q.to_lowercase();
            let hit = [&row.node, &row.name, &row.image, &row.id]
                .into_iter()
                .chain(row.service.as_ref())
                .any(|f| f.to_lowercase().contains(&q));
            if !hit {
                return false;
            }
        }
        true
    }
}

/// One container as the API shows it, from its node's inventory, sample and details.
pub fn container_row(
    node_id: Uuid,
    node: &str,
    c: &ContainerInfo,
    v: &ContainerSample,
    detail: Option<&ContainerDetail>,
    now_ms: i64,
) -> ContainerRow {
    let managed = c.labels.get(labels::MANAGED).map(String::as_str) == Some("true")
        && c.labels.get(labels::NODE) == Some(&node_id.to_string());
    let started = detail.and_then(|d| d.started_unix_ms);
    let running = v.state == nebula_protocol::telemetry::ContainerState::Running;
    ContainerRow {
        node: node.to_owned(),
        id: c.id.clone(),
        name: c.name.clone(),
        image: c.image.clone(),
        labels: c.labels.clone(),
        created: crate::store::rfc3339_millis(crate::store::from_millis(
            c.created_unix.saturating_mul(1000),
        )),
        state: v.state.as_str().to_owned(),
        health: v.health.as_str().to_owned(),
        restart_count: v.restart_count,
        cpu_percent: v.cpu_percent,
        memory_used_bytes: v.memory_used_bytes,
        memory_limit_bytes: v.memory_limit_bytes,
        net_rx_bytes: v.net_rx_bytes,
        net_tx_bytes: v.net_tx_bytes,
        managed,
        service: managed
            .then(|| c.labels.get(labels::SERVICE).cloned())
            .flatten(),
        ports: detail
            .map(|d| d.ports.iter().map(port_text).collect())
            .unwrap_or_default(),
        started_at: started.map(|ms| crate::store::rfc3339_millis(crate::store::from_millis(ms))),
        uptime_secs: started
            .filter(|_| running)
            .map(|ms| (now_ms.saturating_sub(ms).max(0) / 1000) as u64),
    }
}

/// `127.0.0.1:8080->80/tcp`, `8080->80/udp`, `80/tcp` (not published).
fn port_text(p: &nebula_protocol::deploy::PortMapping) -> String {
    let proto = p.protocol.as_str();
    match (p.host_ip.as_deref(), p.host_port) {
        (Some(ip), Some(hp)) if ip != "0.0.0.0" && ip != "::" => {
            format!("{ip}:{hp}->{}/{proto}", p.container_port)
        }
        (_, Some(hp)) => format!("{hp}->{}/{proto}", p.container_port),
        (_, None) => format!("{}/{proto}", p.container_port),
    }
}

fn policy_view(p: &nebula_protocol::containers::DockerPolicySummary) -> DockerPolicyView {
    DockerPolicyView {
        control: p.control.as_str().to_owned(),
        exec: p.exec.as_str().to_owned(),
        logs: p.logs.as_str().to_owned(),
    }
}

/// The warning an action on a managed container carries.
fn managed_warning(row: &ContainerRow, action: ContainerAction) -> Option<String> {
    if !row.managed || !action.changes_state() {
        return None;
    }
    let service = row.service.as_deref().unwrap_or("?");
    Some(format!(
        "`{}` is managed by Nebula (service `{service}`): the reconciler will put it back as the \
         service map says unless the map changes",
        row.name
    ))
}

/// A container reached for a stream: see [`ControlPlane::reach`].
pub(crate) struct Reached {
    pub name: String,
    pub conn: crate::transport::Link,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Keeps the session where it is while the stream is open.
    pub busy: Option<crate::registry::Busy>,
}

/// A container's log as it arrives from its agent.
pub struct LogFollow {
    recv: quinn::RecvStream,
    frames: FrameReader,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _busy: Option<crate::registry::Busy>,
}

impl LogFollow {
    /// The next batch of lines; `Ok(None)` when the log ended.
    pub async fn next(&mut self) -> Result<Option<Vec<LogEntry>>, String> {
        loop {
            match self
                .frames
                .read_message::<LogEvent, _>(&mut self.recv)
                .await
            {
                Ok(LogEvent::Lines(lines)) if lines.is_empty() => continue,
                Ok(LogEvent::Lines(lines)) => return Ok(Some(lines)),
                Ok(LogEvent::End) | Err(proto::FrameError::Closed) => return Ok(None),
                Ok(LogEvent::Error { message } | LogEvent::Refused { message }) => {
                    return Err(message)
                }
                Err(e) => return Err(format!("the node's log stream broke: {e}")),
            }
        }
    }
}

impl std::fmt::Debug for LogFollow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFollow").finish()
    }
}

impl ControlPlane {
    /// Every container in the fleet that `filter` keeps, by node and name.
    pub fn containers(
        &self,
        cx: &OpCtx,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerRow>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let now = nebula_protocol::time::UnixMillis::now().as_i64();
        let mut views = self.telemetry.snapshot();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let mut rows = Vec::new();
        for view in &views {
            if filter.node.as_deref().is_some_and(|n| n != view.name) {
                continue;
            }
            let (Some(inv), Some(s)) = (view.inventory.as_ref(), view.latest.as_ref()) else {
                continue;
            };
            if inv.epoch != s.epoch {
                continue;
            }
            let details = view.details.as_ref().map(|d| &d.containers);
            for (i, (c, v)) in inv.containers.iter().zip(&s.containers).enumerate() {
                let detail = details.and_then(|d| d.get(i));
                let row = container_row(view.id, &view.name, c, v, detail, now);
                if filter.keeps(&row) {
                    rows.push(row);
                }
            }
        }
        Ok(rows)
    }

    /// The node's id by name.
    async fn node_id(&self, node: &str) -> Result<Uuid, OpError> {
        if let Some(n) = self.store.node_by_name(node).await? {
            return Ok(n.id);
        }
        Err(OpError::NotFound(format!("no node named `{node}`")))
    }

    /// A container of a node by name or id (a unique id prefix of 12 or more), as its
    /// telemetry shows it. `None` when the node has reported no containers yet.
    fn find_container(
        &self,
        node_id: Uuid,
        node: &str,
        container: &str,
    ) -> Result<Option<ContainerRow>, OpError> {
        let Some(view) = self.telemetry.view(node_id) else {
            return Ok(None);
        };
        let Some(inv) = view.inventory.as_ref() else {
            return Ok(None);
        };
        let now = nebula_protocol::time::UnixMillis::now().as_i64();
        let matches = |c: &ContainerInfo| {
            c.name == container || (container.len() >= 12 && c.id.starts_with(container))
        };
        let Some(i) = inv.containers.iter().position(matches) else {
            return Err(OpError::NotFound(format!(
                "no container `{container}` on node `{node}`"
            )));
        };
        // Figures from the latest sample when it goes with this inventory (a new inventory
        // may be a moment ahead of its first sample).
        let sample = view
            .latest
            .as_ref()
            .filter(|s| s.epoch == inv.epoch)
            .and_then(|s| s.containers.get(i).cloned())
            .unwrap_or_default();
        let detail = view.details.as_ref().and_then(|d| d.containers.get(i));
        Ok(Some(container_row(
            node_id,
            node,
            &inv.containers[i],
            &sample,
            detail,
            now,
        )))
    }

    /// One container, with what its node's policy would refuse for it.
    pub async fn container(
        &self,
        cx: &OpCtx,
        node: &str,
        container: &str,
    ) -> Result<ContainerView, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let node_id = self.node_id(node).await?;
        let row = self
            .find_container(node_id, node, container)?
            .ok_or_else(|| {
                OpError::NotFound(format!(
                    "node `{node}` has not reported its containers (is it online?)"
                ))
            })?;
        let policy = self.registry.docker_policy(node_id);
        let mut refusals = nebula_protocol::Labels::new();
        if let Some(p) = &policy {
            for (key, name) in [
                (PolicyKey::Control, "control"),
                (PolicyKey::Exec, "exec"),
                (PolicyKey::Logs, "logs"),
            ] {
                if let Some(r) = p.refusal(key, &row.name, row.managed) {
                    refusals.insert(name.to_owned(), r);
                }
            }
        }
        Ok(ContainerView {
            container: row,
            policy: policy.as_ref().map(policy_view),
            refusals,
        })
    }

    /// Start, stop, restart, kill, remove a container or pull its image again, as a job on its
    /// node. Refused here when the node's reported policy would refuse it (the agent checks
    /// again). Returns the job and, for a container Nebula manages, the warning that the
    /// reconciler will put it back.
    pub async fn container_action(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
        container: &str,
        action: ContainerAction,
    ) -> Result<(JobRecord, Option<String>), OpError> {
        self.authorize(cx, Op::ControlContainer)?;
        if !valid_container_ref(container) {
            return Err(OpError::Invalid(format!(
                "`{container}` is not a container name or id"
            )));
        }
        let node_id = self.node_id(node).await?;
        let row = self.find_container(node_id, node, container)?;
        let (name, managed) = match &row {
            Some(r) => (r.name.clone(), r.managed),
            None => (container.to_owned(), false),
        };
        if let (Some(policy), Some(_)) = (self.registry.docker_policy(node_id), &row) {
            if let Some(refusal) = policy.refusal(PolicyKey::Control, &name, managed) {
                return Err(OpError::Forbidden(refusal));
            }
        }
        let warning = row.as_ref().and_then(|r| managed_warning(r, action));
        let job = self
            .create_job(
                NewJob {
                    work: Work::Container {
                        container: name.clone(),
                        action: ContainerActionKind::from_action(action),
                    },
                    target: Target::Node(node.to_owned()),
                    deadline: Some(Duration::from_secs(if action == ContainerAction::Pull {
                        1800
                    } else {
                        120
                    })),
                    idempotent: false,
                    max_attempts: None,
                },
                cx,
            )
            .await?;
        self.record(
            cx,
            Change {
                action: match action {
                    ContainerAction::Start => "container.start",
                    ContainerAction::Stop => "container.stop",
                    ContainerAction::Restart => "container.restart",
                    ContainerAction::Kill => "container.kill",
                    ContainerAction::Remove => "container.remove",
                    ContainerAction::Pull => "container.pull",
                },
                target: format!("{node}/{name}"),
                detail: serde_json::json!({
                    "job": job.id,
                    "managed": managed,
                    "warning": warning,
                }),
                event: None,
            },
        );
        Ok((job, warning))
    }

    /// What a log follower or a shell needs before it opens a stream: a valid name, the node,
    /// the container's own name (when the node has reported it), no refusal by the node's
    /// reported policy for `key`, its live connection, and one of `slots` (`None` when none
    /// is free; the caller says which limit was hit).
    pub(crate) async fn reach(
        &self,
        node: &str,
        container: &str,
        key: PolicyKey,
        slots: &Arc<tokio::sync::Semaphore>,
    ) -> Result<Reached, OpError> {
        if !valid_container_ref(container) {
            return Err(OpError::Invalid(format!(
                "`{container}` is not a container name or id"
            )));
        }
        let node_id = self.node_id(node).await?;
        let row = self.find_container(node_id, node, container)?;
        if let (Some(policy), Some(r)) = (self.registry.docker_policy(node_id), &row) {
            if let Some(refusal) = policy.refusal(key, &r.name, r.managed) {
                return Err(OpError::Forbidden(refusal));
            }
        }
        let conn = self
            .registry
            .connection(node_id)
            .ok_or_else(|| OpError::Conflict(format!("node `{node}` is offline")))?;
        Ok(Reached {
            name: row.map(|r| r.name).unwrap_or_else(|| container.to_owned()),
            conn,
            permit: slots.clone().try_acquire_owned().ok(),
            busy: self.registry.busy(node_id),
        })
    }

    /// Follow (or read) a container's log from its node. Answers once the node has accepted
    /// the request (or refused it: the refusal names the node's rule).
    pub async fn follow_logs(
        &self,
        cx: &OpCtx,
        node: &str,
        req: LogsRequest,
    ) -> Result<LogFollow, OpError> {
        self.authorize(cx, Op::ReadLogs)?;
        let reached = self
            .reach(node, &req.container, PolicyKey::Logs, &self.log_followers)
            .await?;
        let busy = reached.busy;
        let (conn, permit) = (
            reached.conn,
            reached.permit.ok_or_else(|| {
                OpError::TooManyRequests(format!(
                    "{MAX_LOG_FOLLOWERS} logs are being followed already; try again later"
                ))
            })?,
        );
        let req = LogsRequest {
            container: reached.name,
            ..req
        };
        let opened = async {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            proto::write_message(&mut send, &JobControl::Logs(req))
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let mut frames = FrameReader::new(MAX_LOG_FRAME);
            let mut recv = recv;
            let first = frames
                .read_message::<LogEvent, _>(&mut recv)
                .await
                .map_err(|e| format!("the node did not answer: {e}"))?;
            Ok::<_, String>((first, recv, frames))
        };
        let (first, recv, frames) = tokio::time::timeout(Duration::from_secs(15), opened)
            .await
            .map_err(|_| OpError::Conflict(format!("node `{node}` did not answer in time")))?
            .map_err(OpError::Conflict)?;
        match first {
            LogEvent::Lines(_) | LogEvent::End => Ok(LogFollow {
                recv,
                frames,
                _permit: permit,
                _busy: busy,
            }),
            LogEvent::Refused { message } => Err(OpError::Forbidden(message)),
            LogEvent::Error { message } if message.starts_with("no container") => {
                Err(OpError::NotFound(message))
            }
            LogEvent::Error { message } => Err(OpError::Conflict(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::deploy::{PortMapping, PortProtocol};

    #[test]
    fn ports_read_like_docker_ps() {
        let p = |ip: Option<&str>, hp, cp, proto| PortMapping {
            host_ip: ip.map(str::to_owned),
            host_port: hp,
            container_port: cp,
            protocol: proto,
        };
        assert_eq!(
            port_text(&p(Some("127.0.0.1"), Some(8080), 80, PortProtocol::Tcp)),
            "127.0.0.1:8080->80/tcp"
        );
        assert_eq!(
            port_text(&p(Some("0.0.0.0"), Some(53), 53, PortProtocol::Udp)),
            "53->53/udp"
        );
        assert_eq!(port_text(&p(None, None, 80, PortProtocol::Tcp)), "80/tcp");
    }

    #[test]
    fn managed_rows_warn_and_filters_search_every_name() {
        let node = Uuid::from_u128(1);
        let mut info = ContainerInfo {
            id: "abc123".into(),
            name: "web-1".into(),
            image: "nebula-test/web:v2".into(),
            ..Default::default()
        };
        let sample = ContainerSample {
            state: nebula_protocol::telemetry::ContainerState::Running,
            ..Default::default()
        };
        let detail = ContainerDetail {
            started_unix_ms: Some(1_000),
            ports: Vec::new(),
        };
        let row = container_row(node, "n1", &info, &sample, Some(&detail), 61_000);
        assert!(!row.managed && row.service.is_none());
        assert_eq!(row.uptime_secs, Some(60));
        assert_eq!(managed_warning(&row, ContainerAction::Stop), None);
        info.labels.insert(labels::MANAGED.into(), "true".into());
        info.labels.insert(labels::NODE.into(), node.to_string());
        info.labels.insert(labels::SERVICE.into(), "web".into());
        let row = container_row(node, "n1", &info, &sample, None, 61_000);
        assert!(row.managed);
        assert_eq!(row.uptime_secs, None, "no start time, no uptime");
        let w = managed_warning(&row, ContainerAction::Stop).unwrap();
        assert!(
            w.contains("service `web`") && w.contains("reconciler"),
            "{w}"
        );
        assert_eq!(managed_warning(&row, ContainerAction::Pull), None);
        // Another node's label is not this node's container.
        let other = container_row(Uuid::from_u128(2), "n2", &info, &sample, None, 0);
        assert!(!other.managed);
        let f = |search: &str| ContainerFilter {
            search: Some(search.into()),
            ..Default::default()
        };
        assert!(f("WEB").keeps(&row));
        assert!(f("nebula-test").keeps(&row));
        assert!(f("n1").keeps(&row));
        assert!(!f("postgres").keeps(&row));
        let managed_only = ContainerFilter {
            managed: Some(true),
            ..Default::default()
        };
        assert!(managed_only.keeps(&row) && !managed_only.keeps(&other));
    }
}
