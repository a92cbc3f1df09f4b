//! Live sessions: which nodes are connected right now, over which link (this replica's own QUIC
//! connection to the agent, or another replica's, relayed).
//!
//! A node has at most one session. A new connection from the same node replaces the old one; each
//! session carries a generation number so that the old session's cleanup cannot mark the node
//! offline after the new one registered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nebula_protocol::containers::DockerPolicySummary;
use nebula_protocol::deploy::DeployPolicySummary;
use uuid::Uuid;

use crate::transport::Link;

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub generation: u64,
    pub name: String,
    pub remote: SocketAddr,
    pub connected_at: SystemTime,
    /// From this session's `Hello` (the store may not show it yet to a concurrent reader).
    pub agent_version: String,
    /// The protocol minor the agent speaks (what it may be sent).
    pub protocol_minor: u32,
    /// The replica holding the agent's connection, when another one relays it.
    pub relayed_by: Option<String>,
}

struct Entry {
    info: SessionInfo,
    conn: Link,
    /// What the node's agent said its deploy policy allows (1.5+), for this session: it goes
    /// with the session (an agent sends it again on every connection, and its config may have
    /// changed in between), and is `None` for older agents.
    deploy_policy: Option<DeployPolicySummary>,
    docker_policy: Option<DockerPolicySummary>,
    /// Long-lived streams open on this session ([`Busy`]).
    busy: Arc<AtomicUsize>,
}

/// Something long-lived open on a node's session (a followed log, a terminal, an inference
/// stream), held while it lasts: a busy session is not moved to another replica.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Uuid, Entry>>,
    next_generation: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("online", &self.online_count())
            .finish()
    }
}

impl Registry {
    /// Register a session; returns its generation and the connection it replaced, if any.
    pub fn insert(
        &self,
        node: Uuid,
        name: String,
        agent_version: String,
        protocol_minor: u32,
        conn: Link,
    ) -> (u64, Option<Link>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let info = SessionInfo {
            generation,
            name,
            remote: conn.remote_address(),
            connected_at: SystemTime::now(),
            agent_version,
            protocol_minor,
            relayed_by: conn.relayed_by().map(str::to_owned),
        };
        let old = self
            .lock()
            .insert(
                node,
                Entry {
                    info,
                    conn,
                    deploy_policy: None,
                    docker_policy: None,
                    busy: Arc::default(),
                },
            )
            .map(|e| e.conn);
        (generation, old)
    }

    /// Remove the session if it is still the given generation. True when it was removed (the
    /// node is now offline).
    pub fn remove_if_current(&self, node: Uuid, generation: u64) -> bool {
        let mut map = self.lock();
        if map
            .get(&node)
            .is_some_and(|e| e.info.generation == generation)
        {
            map.remove(&node);
            true
        } else {
            false
        }
    }

    /// Close a node's session (if any) with the given code and reason.
    pub fn disconnect(&self, node: Uuid, code: u32, reason: &str) -> bool {
        let entry = self.lock().remove(&node);
        match entry {
            Some(e) => {
                e.conn.close(code, reason);
                true
            }
            None => false,
        }
    }

    /// Close a node's session with the given code and reason if it is still the given
    /// generation (a newer one is left alone) and nothing long-lived is open on it ([`Busy`]);
    /// the session's own end marks the node offline. True when it was closed.
    pub fn close_if_idle(&self, node: Uuid, generation: u64, code: u32, reason: &str) -> bool {
        match self.lock().get(&node) {
            Some(e) if e.info.generation == generation && e.busy.load(Ordering::Relaxed) == 0 => {
                e.conn.close(code, reason);
                true
            }
            _ => false,
        }
    }

    /// Every live session: the node, what is known of its session, and whether it is busy.
    pub fn sessions(&self) -> Vec<(Uuid, SessionInfo, bool)> {
        self.lock()
            .iter()
            .map(|(node, e)| {
                let busy = e.busy.load(Ordering::Relaxed) > 0;
                (*node, e.info.clone(), busy)
            })
            .collect()
    }

    /// Mark the node's session busy while the guard lives (`None` when it is offline).
    pub fn busy(&self, node: Uuid) -> Option<Busy> {
        self.lock().get(&node).map(|e| {
            e.busy.fetch_add(1, Ordering::Relaxed);
            Busy(e.busy.clone())
        })
    }

    /// Record the deploy policy a session's agent reported. True when it differs from what the
    /// node's session had (plans for it may change); false when unchanged, or when `generation`
    /// is no longer the node's session.
    pub fn set_deploy_policy(
        &self,
        node: Uuid,
        generation: u64,
        policy: DeployPolicySummary,
    ) -> bool {
        let mut map = self.lock();
        match map.get_mut(&node) {
            Some(e) if e.info.generation == generation => {
                let changed = e.deploy_policy.as_ref() != Some(&policy);
                e.deploy_policy = Some(policy);
                changed
            }
            _ => false,
        }
    }

    /// Record the `[docker]` policy a session's agent reported (ignored when `generation` is
    /// no longer the node's session).
    pub fn set_docker_policy(&self, node: Uuid, generation: u64, policy: DockerPolicySummary) {
        if let Some(e) = self.lock().get_mut(&node) {
            if e.info.generation == generation {
                e.docker_policy = Some(policy);
            }
        }
    }

    /// The `[docker]` policy the node's live session reported, if any.
    pub fn docker_policy(&self, node: Uuid) -> Option<DockerPolicySummary> {
        self.lock().get(&node).and_then(|e| e.docker_policy.clone())
    }

    /// The deploy policy the node's live session reported, if any.
    pub fn deploy_policy(&self, node: Uuid) -> Option<DeployPolicySummary> {
        self.lock().get(&node).and_then(|e| e.deploy_policy.clone())
    }

    pub fn get(&self, node: Uuid) -> Option<SessionInfo> {
        self.lock().get(&node).map(|e| e.info.clone())
    }

    /// The live link of a node, to open job streams on.
    pub fn connection(&self, node: Uuid) -> Option<Link> {
        self.lock().get(&node).map(|e| e.conn.clone())
    }

    /// The protocol minor of the node's session, when it has one.
    pub fn protocol_minor(&self, node: Uuid) -> Option<u32> {
        self.lock().get(&node).map(|e| e.info.protocol_minor)
    }

    pub fn is_online(&self, node: Uuid) -> bool {
        self.lock().contains_key(&node)
    }

    pub fn online_count(&self) -> usize {
        self.lock().len()
    }

    /// Close every session (controller shutdown).
    pub fn close_all(&self, code: u32, reason: &str) {
        for (_, e) in self.lock().drain() {
            e.conn.close(code, reason);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
