//! Waking sleeping nodes and putting them to sleep.
//!
//! `wake_node` picks the first online relay the service map names for the node and sends it a
//! `wake` job (a magic packet onto the node's LAN) or, for `exec` wake settings, runs the
//! allow-listed command on the `via` node. The node shows `waking` until it registers, or
//! `wake_failed` (and an event) once `wake_timeout` passes. The job scheduler calls
//! `wake_on_demand` when only offline nodes fit a queued job: one of them that can be woken is
//! woken, and the job is dispatched when it registers (within the job's deadline).
//!
//! Task: [`wake_watch`] clears a wake when its node comes online and marks expired ones failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::authz::{Change, Op, OpCtx};
use crate::desired::plan::WakeRule;
use crate::events::Event;
use crate::jobs::model::{JobRecord, Target, Work};
use crate::jobs::NewJob;
use crate::store::millis;
use crate::{ControlPlane, OpError};

pub use nebula_types::api::nodes::Wake;

#[derive(Debug, Default)]
pub struct WakeTable {
    inner: Mutex<HashMap<Uuid, Wake>>,
}

impl WakeTable {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Wake>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wake of a node, if one is in progress or failed.
    pub fn get(&self, node: Uuid) -> Option<Wake> {
        self.lock().get(&node).cloned()
    }
}

impl ControlPlane {
    fn wake_rule(&self, name: &str) -> Option<WakeRule> {
        self.desired
            .active()
            .and_then(|a| a.desired.wake.get(name).cloned())
    }

    /// Wake `name` through a relay; the node shows `waking` until it registers.
    pub async fn wake_node(self: &Arc<Self>, name: &str, cx: &OpCtx) -> Result<Wake, OpError> {
        self.authorize(cx, Op::WakeNode)?;
        let node = self
            .store
            .node_by_name(name)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no node named `{name}`")))?;
        if self.registry.is_online(node.id) {
            return Err(OpError::Conflict(format!("`{name}` is online already")));
        }
        let rule = self.wake_rule(name).ok_or_else(|| {
            OpError::Conflict(format!(
                "`{name}` has no wake settings (nodes.{name}.wake in the service map)"
            ))
        })?;
        let relays: Vec<String> = match &rule {
            WakeRule::Packet { via, .. } => via.clone(),
            WakeRule::Exec { via, .. } => vec![via.clone()],
        };
        let mut relay = None;
        for r in &relays {
            if let Some(n) = self.store.node_by_name(r).await? {
                if self.registry.is_online(n.id) {
                    relay = Some(r.clone());
                    break;
                }
            }
        }
        let relay = relay.ok_or_else(|| {
            OpError::Conflict(format!(
                "no relay for `{name}` is online ({})",
                relays.join(", ")
            ))
        })?;
        let work = match &rule {
            WakeRule::Packet { mac, broadcast, .. } => Work::Wake {
                mac: mac.clone(),
                broadcast: Some(broadcast.clone()),
            },
            WakeRule::Exec { exec, .. } => Work::Exec {
                op: exec.clone(),
                args: Vec::new(),
            },
        };
        let job = self
            .create_job(
                NewJob {
                    work,
                    target: Target::Node(relay.clone()),
                    deadline: Some(Duration::from_secs(60)),
                    idempotent: false,
                    max_attempts: Some(1),
                },
                cx,
            )
            .await?;
        let now = millis(SystemTime::now());
        let wake = Wake {
            node: name.to_owned(),
            relay: relay.clone(),
            job: job.id,
            started_at: now,
            until: now + self.config.wake_timeout.as_millis() as i64,
            failed: false,
        };
        self.wakes.lock().insert(node.id, wake.clone());
        self.record(
            cx,
            Change {
                action: "node.wake",
                target: name.to_owned(),
                detail: serde_json::json!({ "relay": relay, "job": job.id }),
                event: Some(Event::NodeWaking {
                    id: node.id,
                    name: name.to_owned(),
                    relay,
                }),
            },
        );
        Ok(wake)
    }

    /// The job that runs the node's allow-listed sleep command (`nodes.NAME.sleep` in the
    /// service map).
    pub(crate) fn sleep_job(&self, name: &str) -> Result<NewJob, OpError> {
        let op = self
            .desired
            .active()
            .and_then(|a| a.desired.sleep.get(name).cloned())
            .ok_or_else(|| {
                OpError::Conflict(format!(
                    "`{name}` has no sleep command (nodes.{name}.sleep in the service map)"
                ))
            })?;
        Ok(NewJob {
            work: Work::Exec {
                op,
                args: Vec::new(),
            },
            target: Target::Node(name.to_owned()),
            deadline: Some(Duration::from_secs(60)),
            idempotent: false,
            max_attempts: Some(1),
        })
    }

    /// Run the node's allow-listed sleep command (`nodes.NAME.sleep` in the service map).
    pub async fn sleep_node(
        self: &Arc<Self>,
        name: &str,
        cx: &OpCtx,
    ) -> Result<JobRecord, OpError> {
        self.authorize(cx, Op::SleepNode)?;
        let job = self.create_job(self.sleep_job(name)?, cx).await?;
        // The job's events say when the node went down.
        self.record(
            cx,
            Change {
                action: "node.sleep",
                target: name.to_owned(),
                detail: serde_json::json!({ "job": job.id }),
                event: None,
            },
        );
        Ok(job)
    }

    /// Routing found only these offline nodes for a job: wake one that can be woken (unless a
    /// wake for one of them is already under way or failed recently).
    pub(crate) fn wake_on_demand(self: &Arc<Self>, asleep: &[Uuid]) {
        if asleep.iter().any(|id| self.wakes.get(*id).is_some()) {
            return;
        }
        let cp = self.clone();
        let asleep = asleep.to_vec();
        self.tracker.spawn(async move {
            for id in asleep {
                let Ok(Some(node)) = cp.store.node_by_id(id).await else {
                    continue;
                };
                if cp.wake_rule(&node.name).is_none() {
                    continue;
                }
                match cp
                    .wake_node(&node.name, &OpCtx::internal("scheduler"))
                    .await
                {
                    Ok(_) => return,
                    Err(e) => tracing::warn!(node = %node.name, "waking for a job: {e}"),
                }
            }
        });
    }
}

/// Clear wakes whose node came online; mark expired ones failed (with an event).
pub async fn wake_watch(cp: Arc<ControlPlane>, shutdown: CancellationToken) {
    let mut events = cp.events.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.recv() => {
                if let Ok(Event::NodeOnline { id, .. }) = ev {
                    cp.wakes.lock().remove(&id);
                }
            }
            _ = tick.tick() => {
                let now = millis(SystemTime::now());
                let mut failed = Vec::new();
                {
                    let mut w = cp.wakes.lock();
                    for (id, wake) in w.iter_mut() {
                        if !wake.failed && now > wake.until {
                            wake.failed = true;
                            failed.push((*id, wake.node.clone()));
                        }
                    }
                    // A failed wake is shown for a while, then forgotten (a new one may start).
                    let keep = cp.config.wake_timeout.as_millis() as i64;
                    w.retain(|_, wake| !wake.failed || now <= wake.until + keep);
                }
                for (id, name) in failed {
                    tracing::warn!(node = %name, "the node did not come online after its wake");
                    cp.events.publish(Event::NodeWakeFailed { id, name });
                }
            }
        }
    }
}
