//! An agent's authenticated session: the certificate checks and `Hello`, then a [`Session`]
//! that owns the connection and the session stream and serves them until the connection ends,
//! with one method per message family (certificates, deploy policy, inventories, telemetry,
//! releases, the end of the session).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nebula_protocol::release::AgentRelease;
use nebula_protocol::telemetry::{Datagram, TelemetryInventory};
use nebula_protocol::{
    self as proto, close, AgentMessage, ControllerMessage, FrameError, Hello, NodeFacts, Refusal,
    RefusalCode, ServerHello, Welcome, PROTOCOL_VERSION,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;

use super::Link;
use super::{
    protocol_error, refuse, version_refusal, FIRST_STREAM_TIMEOUT, SESSION_BIDI_STREAMS,
    SESSION_RECEIVE_WINDOW, SESSION_UNI_STREAMS,
};
use crate::ca::{peer_identity, PeerIdentity};
use crate::events::Event;
use crate::store::millis;
use crate::ControlPlane;

type Releases = watch::Receiver<Arc<Vec<AgentRelease>>>;
type Monitors = watch::Receiver<Arc<crate::monitors::Assignments>>;

/// Serve a connection on the session ALPN: verify who it is, then serve its session here when
/// this replica leads, or relay it to the leader ([`super::relay`]) when it follows.
pub(super) async fn session_connection(
    cp: &Arc<ControlPlane>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let remote = conn.remote_address();
    let Some(identity) = super::client_leaf(&conn).and_then(|leaf| peer_identity(&leaf)) else {
        warn!(%remote, "session refused: no client certificate");
        conn.close(
            close::REFUSED.into(),
            b"client certificate required on nebula/1 (enroll first with a join token)",
        );
        return Ok(());
    };
    // Followed from here on, so that a step-down during the handshake is not missed.
    let leading = cp.ha.leading();
    if !*leading.borrow() {
        return super::relay::relay_agent(cp, conn, identity, shutdown).await;
    }
    let Some((send, recv)) = super::session_stream(&conn).await? else {
        return Ok(());
    };
    serve_session(
        cp,
        Link::Direct(conn),
        &identity,
        (send, recv),
        leading,
        shutdown,
    )
    .await
}

/// Serve an agent's session, on this replica's own connection or relayed by another replica:
/// read its `Hello`, register it, serve it, and mark the node offline when it ends (unless a
/// newer connection replaced it).
pub(super) async fn serve_session(
    cp: &ControlPlane,
    link: Link,
    identity: &PeerIdentity,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Replicas on PostgreSQL: the leader serves every session (followers relay theirs).
    if !*leading.borrow_and_update() {
        let reason = match cp.ha.leader_quic() {
            Some(at) => format!("this replica does not lead; the leader is at {at}"),
            None => "this replica does not lead; try another".to_owned(),
        };
        link.close(close::NOT_LEADER, &reason);
        return Ok(());
    }
    let Some((session, recv, hello, version)) =
        Session::open(cp, link, identity, send, recv).await?
    else {
        return Ok(());
    };
    let span = tracing::info_span!("session", node = %session.node_id, name = %session.name);
    let remote = session.conn.remote_address();
    let mut session = session;
    let result = async {
        match session.conn.relayed_by() {
            None => info!(%remote, agent_version = %hello.agent_version, "node online"),
            Some(by) => {
                info!(%remote, agent_version = %hello.agent_version, relayed_by = by, "node online")
            }
        }
        session.welcome().await?;
        // Agents from 1.10 on keep the highest leader term seen and refuse a lower one.
        if version.minor >= 10 {
            session.term().await?;
        }
        // Agents from 1.3 on hear which agent builds this controller serves (self-update).
        let releases = (version.minor >= 3).then(|| {
            let mut rx = cp.releases.subscribe();
            rx.mark_changed();
            rx
        });
        // Agents from 1.7 on run monitors: their set goes out now and whenever it changes.
        let monitors = (version.minor >= 7).then(|| {
            let mut rx = cp.monitors.subscribe();
            rx.mark_changed();
            rx
        });
        // Agents from 1.9 on hear every replica's address (to reconnect to another).
        let replicas = (version.minor >= 9 && cp.ha.replicated()).then(|| {
            let mut rx = cp.ha.quic_addrs();
            rx.mark_changed();
            rx
        });
        session
            .serve(recv, releases, monitors, replicas, leading, shutdown)
            .await
    }
    .instrument(span.clone())
    .await;
    session.close().instrument(span).await;
    result
}

/// One authenticated session.
pub(super) struct Session<'a> {
    cp: &'a ControlPlane,
    conn: Link,
    send: quinn::SendStream,
    node_id: Uuid,
    name: String,
    labels: proto::Labels,
    /// This connection's place in the registry (a newer connection of the node replaces it).
    generation: u64,
    /// The node's facts as last stored (the inventory updates GPUs and the container runtime).
    facts: NodeFacts,
    /// The certificate issued on this session and not yet confirmed saved.
    renewed: Option<String>,
    /// The monitors last sent to the agent.
    monitors_sent: Option<Arc<Vec<proto::monitors::MonitorSpec>>>,
    /// The replica holding the connection, as recorded in the store (replicas only).
    owner: Option<String>,
}

/// Whether the session goes on after an input.
enum Flow {
    Continue,
    End,
}

impl<'a> Session<'a> {
    /// Check the client certificate and the `Hello`, then register the session. `None` when
    /// the connection was refused (and closed with the reason).
    async fn open(
        cp: &'a ControlPlane,
        conn: Link,
        identity: &PeerIdentity,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> anyhow::Result<Option<(Self, quinn::RecvStream, Hello, proto::ProtocolVersion)>> {
        let remote = conn.remote_address();
        let node_id = identity.node_id;
        let Some((mut send, recv, hello, version)) =
            read_hello(cp, &conn, node_id, send, recv).await?
        else {
            return Ok(None);
        };
        // Identity comes from the verified certificate; it must be known and live.
        let cert = cp.store.certificate(&identity.serial).await?;
        let node = cp.store.node_by_id(node_id).await?;
        let node = match (cert, node) {
            (Some(c), Some(n)) if c.revoked_at.is_none() && c.node_id == node_id => n,
            _ => {
                warn!(node = %node_id, %remote, serial = %identity.serial, "session refused: certificate revoked or node removed");
                let refusal = Refusal::new(
                    RefusalCode::NodeRevoked,
                    "this node's certificate was revoked (the node was removed); join again with a new token",
                );
                refuse(&conn, &mut send, refusal, close::REVOKED).await?;
                return Ok(None);
            }
        };
        // A node that connects with a newer certificate has saved it: its older ones go.
        // (Looked for with a read first: nearly always there are none.)
        if cp
            .store
            .has_superseded_certificates(node_id, &identity.serial)
            .await
            .unwrap_or(true)
        {
            revoke_superseded(cp, node_id, &identity.serial).await;
        }
        // Authenticated: the windows and stream limits of a session.
        if let Link::Direct(c) = &conn {
            c.set_receive_window(SESSION_RECEIVE_WINDOW.into());
            c.set_max_concurrent_bi_streams(SESSION_BIDI_STREAMS.into());
            c.set_max_concurrent_uni_streams(SESSION_UNI_STREAMS.into());
        }
        let now = millis(SystemTime::now());
        // Replicas: the session's owner (the replica holding the agent's connection) goes in
        // the store with it.
        let owner = cp
            .ha
            .replicated()
            .then(|| conn.relayed_by().unwrap_or(&cp.ha.replica).to_owned());
        cp.store
            .record_session(
                node_id,
                &hello.facts,
                &hello.agent_version,
                owner.as_deref(),
                now,
            )
            .await?;
        cp.telemetry.register(node_id, &node.name);
        let (generation, replaced) = cp.registry.insert(
            node_id,
            node.name.clone(),
            hello.agent_version.clone(),
            u32::from(version.minor),
            conn.clone(),
        );
        cp.metrics
            .agents_connected
            .set(cp.registry.online_count() as i64);
        if let Some(old) = replaced {
            info!(node = %node_id, name = %node.name, "new connection replaces the old one");
            old.close(
                close::REPLACED,
                "replaced by a newer connection from the same node",
            );
        }
        let session = Session {
            cp,
            conn,
            send,
            node_id,
            name: node.name,
            labels: node.labels,
            generation,
            facts: hello.facts.clone(),
            renewed: None,
            monitors_sent: None,
            owner,
        };
        Ok(Some((session, recv, hello, version)))
    }

    /// Say the node is online and send the `Welcome`.
    async fn welcome(&mut self) -> anyhow::Result<()> {
        let cp = self.cp;
        cp.events.publish(Event::NodeOnline {
            id: self.node_id,
            name: self.name.clone(),
        });
        // Jobs waiting for this node (or out on it before a restart) go now.
        cp.jobs.nodes_changed();
        // Its monitors (by labels, built-ins for what it runs) are worked out now.
        cp.monitors.assign_now.activate();
        let welcome = ServerHello::Welcome(Welcome {
            node_id: self.node_id,
            name: self.name.clone(),
            labels: self.labels.clone(),
            controller_version: PROTOCOL_VERSION,
            settings: cp.session_settings(),
        });
        proto::write_message(&mut self.send, &welcome).await?;
        Ok(())
    }

    /// Say this replica's term as leader (replicas on PostgreSQL; nothing on SQLite).
    async fn term(&mut self) -> anyhow::Result<()> {
        if let Some(term) = self.cp.ha.term() {
            let msg = ControllerMessage::Term(u64::try_from(term).unwrap_or_default());
            proto::write_message(&mut self.send, &msg).await?;
        }
        Ok(())
    }

    /// Serve the session until it ends: one `select!` over its inputs, each handed to its
    /// method.
    async fn serve(
        &mut self,
        mut recv: quinn::RecvStream,
        mut releases: Option<Releases>,
        mut monitors: Option<Monitors>,
        mut replicas: Option<watch::Receiver<Arc<Vec<String>>>>,
        mut leading: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        // Cancel-safe: the select below may drop a read in the middle of a frame.
        let mut frames = proto::FrameReader::new(self.cp.config.max_frame_bytes);
        let conn = self.conn.clone();
        // A step-down while the session was being set up counts too.
        leading.mark_changed();
        loop {
            let flow = tokio::select! {
                changed = async { replicas.as_mut()?.changed().await.ok() }, if replicas.is_some() => {
                    match (changed, replicas.as_mut()) {
                        (Some(()), Some(rx)) => {
                            let list = rx.borrow_and_update().clone();
                            let msg = ControllerMessage::Replicas(list.as_ref().clone());
                            proto::write_message(&mut self.send, &msg).await?;
                            Flow::Continue
                        }
                        _ => {
                            replicas = None;
                            Flow::Continue
                        }
                    }
                }
                Ok(()) = leading.changed(), if self.cp.ha.replicated() => {
                    if *leading.borrow_and_update() {
                        Flow::Continue
                    } else {
                        info!("this replica stopped leading: the agent goes to the new leader");
                        self.conn.close(close::NOT_LEADER, "this replica stopped leading");
                        Flow::End
                    }
                }
                changed = async { releases.as_mut()?.changed().await.ok() }, if releases.is_some() => {
                    match (changed, releases.as_mut()) {
                        (Some(()), Some(rx)) => {
                            let list = rx.borrow_and_update().clone();
                            self.releases(&list).await?
                        }
                        _ => {
                            releases = None;
                            Flow::Continue
                        }
                    }
                }
                changed = async { monitors.as_mut()?.changed().await.ok() }, if monitors.is_some() => {
                    match (changed, monitors.as_mut()) {
                        (Some(()), Some(rx)) => {
                            let all = rx.borrow_and_update().clone();
                            self.monitors(&all).await?
                        }
                        _ => {
                            monitors = None;
                            Flow::Continue
                        }
                    }
                }
                dg = conn.read_datagram() => match dg {
                    Ok(bytes) => {
                        self.sample(&bytes);
                        Flow::Continue
                    }
                    Err(_) => Flow::End,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(uni) => {
                        self.sample_stream(uni).await;
                        Flow::Continue
                    }
                    Err(_) => Flow::End,
                },
                _ = shutdown.cancelled() => {
                    self.shutdown().await;
                    Flow::End
                }
                _ = conn.closed() => Flow::End,
                msg = frames.read_message::<AgentMessage, _>(&mut recv) => self.message(msg).await?,
            };
            if let Flow::End = flow {
                return Ok(());
            }
        }
    }

    /// One message on the session stream.
    async fn message(&mut self, msg: Result<AgentMessage, FrameError>) -> anyhow::Result<Flow> {
        match msg {
            Ok(AgentMessage::RenewCertificate { csr_der }) => self.renew(&csr_der).await?,
            Ok(AgentMessage::CertificateSaved) => {
                if let Some(serial) = self.renewed.take() {
                    revoke_superseded(self.cp, self.node_id, &serial).await;
                }
            }
            Ok(AgentMessage::DeployPolicy(policy)) => self.deploy_policy(policy),
            Ok(AgentMessage::DockerPolicy(policy)) => {
                debug!(?policy, "docker policy");
                let cp = self.cp;
                cp.registry
                    .set_docker_policy(self.node_id, self.generation, policy);
            }
            Ok(AgentMessage::ContainerDetails(details)) => {
                let _ = self.cp.telemetry.set_details(self.node_id, details);
            }
            Ok(AgentMessage::Bye { reason }) => {
                info!(%reason, "agent said bye");
                self.conn.close(close::NORMAL, "bye");
                return Ok(Flow::End);
            }
            Ok(AgentMessage::Unsupported { variant }) => {
                debug!(variant, "agent does not support a message we sent");
            }
            Ok(AgentMessage::MonitorResults(batch)) => self.monitor_results(batch),
            Ok(AgentMessage::AiInventory(inv)) => self.ai_inventory(inv),
            Ok(AgentMessage::TelemetryInventory(inv)) => self.telemetry_inventory(inv).await?,
            Err(FrameError::UnknownVariant { index, .. }) => {
                // A newer agent minor: answer, never fail.
                let answer = ControllerMessage::Unsupported { variant: index };
                proto::write_message(&mut self.send, &answer).await?;
            }
            Err(FrameError::Closed) => return Ok(Flow::End),
            Err(e) => {
                protocol_error(self.cp, &self.conn, self.node_id, &e)?;
                return Ok(Flow::End);
            }
        }
        Ok(Flow::Continue)
    }

    /// Certificates: issue a renewed one for the agent's CSR (its older ones are revoked once
    /// it says the new one is saved).
    async fn renew(&mut self, csr_der: &[u8]) -> anyhow::Result<()> {
        let cp = self.cp;
        let issued =
            cp.ca
                .issue_node_cert(self.node_id, &self.name, csr_der, cp.config.cert_lifetime);
        let reply = match issued {
            Ok(issued) => {
                let now = millis(SystemTime::now());
                cp.store
                    .add_certificate(&issued.record(self.node_id, now))
                    .await?;
                info!(serial = %issued.serial, "certificate renewed");
                self.renewed = Some(issued.serial.clone());
                cp.events.publish(Event::CertificateRenewed {
                    id: self.node_id,
                    name: self.name.clone(),
                    serial: issued.serial,
                });
                ControllerMessage::CertificateRenewed {
                    cert_der: issued.der,
                }
            }
            Err(e) => ControllerMessage::RenewalRefused(Refusal::new(
                RefusalCode::InvalidRequest,
                format!("{e:#}"),
            )),
        };
        proto::write_message(&mut self.send, &reply).await?;
        Ok(())
    }

    /// Monitors: send this node's set when it differs from what the agent has (always once,
    /// at session start: the agent may still run a set from before).
    async fn monitors(&mut self, all: &crate::monitors::Assignments) -> anyhow::Result<Flow> {
        let mine = all.get(&self.node_id).cloned().unwrap_or_default();
        if self.monitors_sent.as_ref() == Some(&mine) {
            return Ok(Flow::Continue);
        }
        let msg = ControllerMessage::Monitors(mine.as_ref().clone());
        proto::write_message(&mut self.send, &msg).await?;
        debug!(count = mine.len(), "monitors sent");
        self.monitors_sent = Some(mine);
        Ok(Flow::Continue)
    }

    /// Monitors: results, kept (only for monitors this node runs); a change of state is an
    /// event.
    fn monitor_results(&self, batch: Vec<proto::monitors::MonitorResult>) {
        let now = crate::store::millis(SystemTime::now());
        for (monitor, up) in self
            .cp
            .monitors
            .ingest(self.node_id, &self.name, batch, now)
        {
            self.cp.events.publish(Event::MonitorChanged {
                monitor,
                node: self.name.clone(),
                up,
            });
        }
    }

    /// The deploy policy, kept with the session; a change may turn refusals into actions or
    /// back.
    fn deploy_policy(&self, policy: proto::deploy::DeployPolicySummary) {
        debug!(?policy, "deploy policy");
        if self
            .cp
            .registry
            .set_deploy_policy(self.node_id, self.generation, policy)
        {
            let why = format!("the deploy policy of {} changed", self.name);
            self.cp.desired.kick(&why);
        }
    }

    /// The node's inference backends and models.
    fn ai_inventory(&self, inv: proto::ai::AiInventory) {
        let cp = self.cp;
        cp.ai.set_inventory(self.node_id, &self.name, inv);
        // Desired models may be missing (or present now).
        if cp
            .desired
            .active()
            .is_some_and(|a| !a.desired.models.is_empty())
        {
            cp.desired.kick(&format!("models on {} changed", self.name));
        }
    }

    /// What the node has (GPUs, container runtime, containers), which samples refer to.
    async fn telemetry_inventory(&mut self, inv: TelemetryInventory) -> anyhow::Result<()> {
        let cp = self.cp;
        if self.facts.gpus != inv.gpus || self.facts.container_runtime != inv.container_runtime {
            self.facts.gpus = inv.gpus.clone();
            self.facts.container_runtime = inv.container_runtime.clone();
            cp.store.update_facts(self.node_id, &self.facts).await?;
            cp.jobs.nodes_changed();
        }
        // A container gone from the inventory was removed (`docker rm -f`): say so like a stop,
        // so that the reconciler repairs it at once.
        for c in cp
            .telemetry
            .set_inventory(self.node_id, inv)
            .unwrap_or_default()
        {
            cp.events.publish(Event::ContainerChanged {
                node_id: self.node_id,
                node: self.name.clone(),
                container: c.id,
                name: c.name,
                state: "removed".to_owned(),
                health: "none".to_owned(),
            });
        }
        Ok(())
    }

    /// Decode and take one telemetry sample; anything wrong with it is counted, never fatal.
    fn sample(&self, bytes: &[u8]) {
        let (cp, node_id) = (self.cp, self.node_id);
        let sample = match proto::decode::<Datagram>(bytes) {
            Ok(Datagram::Sample(s)) => s,
            Err(e) => {
                cp.frames_rejected();
                cp.metrics.dropped("malformed");
                debug!(node = %node_id, "malformed telemetry: {e}");
                return;
            }
        };
        match cp.telemetry.ingest(node_id, sample) {
            Ok(changes) => {
                cp.metrics.samples_accepted.inc();
                for c in changes {
                    cp.events.publish(Event::ContainerChanged {
                        node_id,
                        node: self.name.clone(),
                        container: c.container,
                        name: c.name,
                        state: c.state.as_str().to_owned(),
                        health: c.health.as_str().to_owned(),
                    });
                }
            }
            Err(reason) => cp.metrics.dropped(reason.as_str()),
        }
    }

    /// A sample too big for a datagram: one frame on its own stream, read with a deadline so a
    /// slow sender cannot stall the session.
    async fn sample_stream(&self, mut uni: quinn::RecvStream) {
        let cp = self.cp;
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            proto::read_frame(&mut uni, cp.config.max_frame_bytes),
        )
        .await;
        match read {
            Ok(Ok(bytes)) => self.sample(&bytes),
            Ok(Err(e)) => {
                cp.frames_rejected();
                cp.metrics.dropped("malformed");
                debug!("bad telemetry stream: {e}");
            }
            Err(_) => cp.metrics.dropped("timeout"),
        }
    }

    /// The agent builds this controller serves, when they change (self-update).
    async fn releases(&mut self, list: &[AgentRelease]) -> anyhow::Result<Flow> {
        if !list.is_empty() {
            let msg = ControllerMessage::AgentReleases(list.to_vec());
            proto::write_message(&mut self.send, &msg).await?;
        }
        Ok(Flow::Continue)
    }

    /// The controller stops: say bye and close.
    async fn shutdown(&mut self) {
        let bye = ControllerMessage::Bye {
            reason: "controller shutting down".into(),
        };
        let _ = proto::write_message(&mut self.send, &bye).await;
        self.conn.close(close::SHUTDOWN, "controller shutting down");
    }

    /// The session is over: unless a newer connection of the node replaced it, the node is
    /// offline.
    async fn close(self) {
        let cp = self.cp;
        if !cp.registry.remove_if_current(self.node_id, self.generation) {
            return;
        }
        cp.metrics
            .agents_connected
            .set(cp.registry.online_count() as i64);
        let reason = self.conn.close_reason();
        info!(reason = %reason.unwrap_or_default(), "node offline");
        let now = millis(SystemTime::now());
        if let Err(e) = cp
            .store
            .touch_last_seen(self.node_id, self.owner.as_deref(), now)
            .await
        {
            warn!("recording last seen: {e:#}");
        }
        cp.events.publish(Event::NodeOffline {
            id: self.node_id,
            name: self.name,
        });
    }
}

/// The session stream's `Hello`, under one deadline. `None` when the connection was refused
/// for what it sent (and closed with the reason).
async fn read_hello(
    cp: &ControlPlane,
    conn: &Link,
    node_id: uuid::Uuid,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<
    Option<(
        quinn::SendStream,
        quinn::RecvStream,
        Hello,
        proto::ProtocolVersion,
    )>,
> {
    let first = tokio::time::timeout(
        FIRST_STREAM_TIMEOUT,
        proto::read_frame(&mut recv, cp.config.max_frame_bytes),
    )
    .await;
    let payload = match first {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
        Err(_) => {
            conn.close(close::PROTOCOL_ERROR, "no Hello within the deadline");
            return Ok(None);
        }
    };
    let version = match proto::peek_version(&payload) {
        Ok(v) => v,
        Err(e) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
    };
    if !version.is_compatible_with(PROTOCOL_VERSION) {
        let refusal = version_refusal(version);
        warn!(node = %node_id, remote = %conn.remote_address(), "session refused: {}", refusal.message);
        return refuse(conn, &mut send, refusal, close::REFUSED)
            .await
            .map(|()| None);
    }
    let hello: Hello = match proto::decode(&payload) {
        Ok(h) => h,
        Err(e) => return protocol_error(cp, conn, node_id, &e).map(|()| None),
    };
    Ok(Some((send, recv, hello, version)))
}

/// Revoke the node's certificates older than `serial`; a failure is logged, never fatal (the
/// old certificate still expires on its own).
async fn revoke_superseded(cp: &ControlPlane, node_id: uuid::Uuid, serial: &str) {
    match cp
        .store
        .revoke_superseded_certificates(node_id, serial, millis(SystemTime::now()))
        .await
    {
        Ok(0) => {}
        Ok(n) => info!(node = %node_id, %serial, revoked = n, "older certificates revoked"),
        Err(e) => warn!(node = %node_id, "revoking older certificates: {e:#}"),
    }
}
