//! The scheduler: routing candidates, one pass over the unfinished jobs (route, re-send, expire,
//! lose, wake), and the stream task each dispatched job gets.

use nebula_protocol::time::UnixMillis;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nebula_protocol::jobs::JobRequest;
use tokio::sync::{mpsc, watch};
use tracing::debug;
use uuid::Uuid;

use super::router::{self, Candidate, Decision};
use super::{stream, Active, JobState, NodeMeta, TableInner, Target, Write, DEADLINE_SLACK, TICK};
use crate::{ControlPlane, OpError};

impl ControlPlane {
    /// Routing candidates: every enrolled node with its live state.
    pub(crate) async fn candidates(
        &self,
        in_flight: &HashMap<Uuid, usize>,
    ) -> Result<Vec<Candidate>, OpError> {
        let nodes = self.node_meta().await?;
        Ok(nodes
            .iter()
            .map(|n| self.candidate(n, in_flight.get(&n.id).copied().unwrap_or(0)))
            .collect())
    }

    pub(super) fn candidate(&self, n: &NodeMeta, in_flight: usize) -> Candidate {
        let online = self.registry.is_online(n.id);
        let mut c = Candidate {
            id: n.id,
            name: n.name.clone(),
            labels: n.labels.clone(),
            online,
            gpu_count: n.gpu_count,
            in_flight,
            ..Candidate::default()
        };
        if let Some(view) = self.telemetry.view(n.id) {
            if let Some(inv) = &view.inventory {
                c.gpu_count = c.gpu_count.max(inv.gpus.len());
                c.models = inv
                    .models
                    .iter()
                    .map(|m| (m.name.clone(), m.loaded))
                    .collect();
                if let Some(latest) = &view.latest {
                    c.cpu_percent = Some(latest.host.cpu_percent);
                    c.gpu_free_bytes = inv
                        .gpus
                        .iter()
                        .zip(&latest.gpus)
                        .filter_map(|(g, s)| {
                            s.memory_used_bytes
                                .map(|u| g.memory_total_bytes.saturating_sub(u))
                        })
                        .collect();
                }
            }
        }
        c
    }

    pub(super) async fn node_meta(&self) -> Result<Arc<Vec<NodeMeta>>, OpError> {
        if let Some(n) = self
            .jobs
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(n);
        }
        let nodes: Arc<Vec<NodeMeta>> = Arc::new(
            self.store
                .list_nodes()
                .await?
                .into_iter()
                .map(|n| NodeMeta {
                    id: n.id,
                    gpu_count: n.facts.gpus.len(),
                    name: n.name,
                    labels: n.labels,
                })
                .collect(),
        );
        *self.jobs.nodes.lock().unwrap_or_else(|p| p.into_inner()) = Some(nodes.clone());
        Ok(nodes)
    }

    /// Routing found that only these offline nodes fit `job`: wake one that can be woken (the
    /// job is dispatched when it registers, within its deadline).
    pub(super) fn wake_hook(self: &Arc<Self>, job: Uuid, asleep: &[Uuid]) {
        let _ = job;
        self.wake_on_demand(asleep);
    }

    /// One scheduler pass: over every unfinished job, or (kicked by new jobs) over those only.
    pub(super) async fn schedule(self: &Arc<Self>, full: bool) -> Result<(), OpError> {
        // Candidates are built once per pass: every node for selectors, only the named nodes
        // for jobs that name one (the common case, and cheap).
        let (full, ids, selectors, mut named, in_flight) = {
            let mut t = self.jobs.lock();
            let full = full || std::mem::take(&mut t.full);
            let mut ids: Vec<Uuid> = if full {
                t.fresh.clear();
                t.active.keys().copied().collect()
            } else {
                std::mem::take(&mut t.fresh)
            };
            ids.sort_unstable();
            ids.dedup();
            let mut selectors = false;
            let mut named: Vec<String> = Vec::new();
            for a in ids.iter().filter_map(|id| t.active.get(id)) {
                if a.rec.state == JobState::Queued && a.stream.is_none() {
                    match &a.rec.target {
                        Target::Selector(_) => selectors = true,
                        Target::Node(n) => named.push(n.clone()),
                    }
                }
            }
            (full, ids, selectors, named, t.in_flight.clone())
        };
        let mut candidates = if selectors {
            self.candidates(&in_flight).await?
        } else if named.is_empty() {
            Vec::new()
        } else {
            let nodes = self.node_meta().await?;
            named.sort_unstable();
            named.dedup();
            nodes
                .iter()
                .filter(|n| named.binary_search(&n.name).is_ok())
                .map(|n| self.candidate(n, in_flight.get(&n.id).copied().unwrap_or(0)))
                .collect()
        };
        let now = Instant::now();
        let now_ms = UnixMillis::now().as_i64();
        let capacity = self.config.max_jobs_per_node;
        let mut t = self.jobs.lock();
        // Jobs may have been dispatched while the candidates were built: count them.
        for c in candidates.iter_mut() {
            c.in_flight = t.in_flight.get(&c.id).copied().unwrap_or(0);
        }
        let mut waiting = 0;
        for id in ids {
            let Some(a) = t.active.get_mut(&id) else {
                continue;
            };
            let past_deadline = a.rec.deadline.is_some_and(|d| now_ms >= d);
            match a.rec.state {
                JobState::Queued => {
                    if past_deadline {
                        let why = a
                            .rec
                            .reason
                            .clone()
                            .unwrap_or_else(|| "no node was free".into());
                        self.finish_locked(&mut t, id, JobState::TimedOut, |r| {
                            r.reason =
                                Some(format!("deadline passed before the job could run: {why}"));
                        });
                        continue;
                    }
                    match router::route(&a.rec.target, &candidates, &a.rec.excluded, capacity) {
                        Decision::Run { node, name, why } => {
                            let Some(conn) = self.registry.connection(node) else {
                                continue;
                            };
                            a.rec.node_id = Some(node);
                            a.rec.node = Some(name);
                            a.rec.routing = Some(why);
                            a.rec.reason = None;
                            a.rec.state = JobState::Dispatched;
                            a.rec.dispatched_at = Some(now_ms);
                            a.counted = true;
                            // Stored (with its node) before the agent can see it: a restart
                            // then sends it to the same node again, never to another one.
                            let (committed, wait) = watch::channel(false);
                            self.jobs.write(Write::Job {
                                rec: Box::new(a.rec.clone()),
                                from: Some(JobState::Queued),
                                watch: Some(a.watch.clone()),
                                committed: Some(committed),
                            });
                            self.start_stream_locked(a, conn, Some(wait));
                            *t.in_flight.entry(node).or_default() += 1;
                            if let Some(c) = candidates.iter_mut().find(|c| c.id == node) {
                                c.in_flight += 1;
                            }
                        }
                        Decision::Wait { reason, asleep } => {
                            waiting += 1;
                            if a.rec.reason.as_deref() != Some(reason.as_str()) {
                                debug!(job = %id, %reason, "job waits");
                                a.rec.reason = Some(reason);
                                self.jobs.persist(a, None);
                            }
                            if !asleep.is_empty() {
                                self.wake_hook(id, &asleep);
                            }
                        }
                    }
                }
                JobState::Dispatched | JobState::Running => {
                    self.check_dispatched_locked(&mut t, id, now, now_ms);
                }
                _ => {}
            }
        }
        if full {
            t.waiting = waiting;
        } else {
            t.waiting += waiting;
        }
        Ok(())
    }

    /// A dispatched or running job at a scheduling pass: its deadline (cancel, then give up on
    /// a node that never reports the end), and, when its stream is gone, sending it again to its
    /// node once that is back or losing it when the lease runs out.
    pub(super) fn check_dispatched_locked(
        self: &Arc<Self>,
        t: &mut TableInner,
        id: Uuid,
        now: Instant,
        now_ms: i64,
    ) {
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        let deadline_over = a
            .rec
            .deadline
            .is_some_and(|d| now_ms >= d + DEADLINE_SLACK.as_millis() as i64);
        if a.stream.is_some() {
            if deadline_over && !a.deadline_cancel_sent {
                a.deadline_cancel_sent = true;
                if let Some(s) = &a.stream {
                    let _ = s.send("the job's deadline passed".into());
                }
            } else if a.deadline_cancel_sent
                && a.rec
                    .deadline
                    .is_some_and(|d| now_ms >= d + 3 * DEADLINE_SLACK.as_millis() as i64)
            {
                self.finish_locked(t, id, JobState::TimedOut, |r| {
                    r.reason =
                        Some("deadline passed and the node did not report the job's end".into());
                });
            }
            return;
        }
        // Detached: re-send when the node is back, else wait out the lease.
        let conn = a.rec.node_id.and_then(|n| self.registry.connection(n));
        if let Some(conn) = conn {
            debug!(job = %id, "node is back; sending the job again");
            self.start_stream_locked(a, conn, None);
            return;
        }
        let lease = *a
            .lease_until
            .get_or_insert(now + self.config.job_lost_grace);
        if now >= lease {
            let grace = humantime::format_duration(self.config.job_lost_grace);
            self.lose_locked(t, id, format!("the node did not come back within {grace}"));
        }
    }

    /// Spawn the stream task for a job (first delivery or a re-send).
    /// `stored`: the stream opens only once this turns `true` (the assignment is committed).
    pub(super) fn start_stream_locked(
        self: &Arc<Self>,
        a: &mut Active,
        conn: crate::transport::Link,
        stored: Option<watch::Receiver<bool>>,
    ) {
        let req = JobRequest {
            id: a.rec.id,
            attempt: a.rec.attempt,
            deadline_unix_ms: a.rec.deadline,
            logs_from: a.rec.logs_next,
            spec: a.rec.work.to_spec(),
        };
        // An agent from 1.10 on gets the job with the leader's term (and refuses a lower one).
        let fenced = a
            .rec
            .node_id
            .and_then(|n| self.registry.protocol_minor(n))
            .is_some_and(|m| m >= 10);
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(reason) = &a.cancel {
            let _ = tx.send(reason.clone());
        }
        a.stream = Some(tx);
        a.lease_until = None;
        let cp = self.clone();
        self.tracker.spawn(async move {
            if let Some(mut stored) = stored {
                if stored.wait_for(|c| *c).await.is_err() {
                    return;
                }
            }
            stream::run(cp, conn, req, fenced, rx).await
        });
    }
}

/// One pass of the scheduler task: every unfinished job on its period (and at start), only the
/// jobs that kicked it when activated.
pub async fn schedule_pass(
    cp: &Arc<ControlPlane>,
    trigger: crate::tasks::Trigger,
) -> anyhow::Result<serde_json::Value> {
    let full = trigger != crate::tasks::Trigger::Activated;
    cp.schedule(full).await?;
    Ok(serde_json::json!({ "full": full }))
}

/// How often the scheduler makes a full pass without being kicked.
pub const SCHEDULER_PERIOD: Duration = TICK;
