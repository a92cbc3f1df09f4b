//! What agents report about their jobs: progress, logs, the result, a lost stream; a job moves
//! to its final state here.

use nebula_protocol::time::UnixMillis;
use std::time::Instant;

use nebula_protocol::jobs::{JobResult, JobStatus};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    release, JobLogLine, JobRecord, JobState, ModelJobInFlight, TableInner, Target, Work, Write,
    RECENT_LOGS,
};
use crate::ControlPlane;

impl ControlPlane {
    /// Move a job to a final state under the table lock; `edit` fills in the details.
    pub(super) fn finish_locked(
        &self,
        t: &mut TableInner,
        id: Uuid,
        state: JobState,
        edit: impl FnOnce(&mut JobRecord),
    ) {
        let Some(mut a) = t.active.remove(&id) else {
            return;
        };
        let from = a.rec.state;
        a.rec.state = state;
        a.rec.finished_at = Some(UnixMillis::now().as_i64());
        edit(&mut a.rec);
        release(&mut t.in_flight, &mut a);
        info!(job = %id, state = %state, node = ?a.rec.node, "job ended");
        self.jobs.persist(&a, Some(from));
        self.jobs.kick_if_waiting(t);
    }

    /// The agent's result arrived.
    pub(crate) fn job_finished(&self, id: Uuid, attempt: u32, mut result: JobResult) {
        self.filter_model_answer(id, &mut result);
        let mut t = self.jobs.lock();
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        if a.rec.attempt != attempt {
            return;
        }
        let state = match result.status {
            JobStatus::Succeeded => JobState::Succeeded,
            JobStatus::Failed | JobStatus::Refused => JobState::Failed,
            JobStatus::Cancelled => JobState::Cancelled,
            JobStatus::TimedOut => JobState::TimedOut,
            JobStatus::Interrupted => JobState::Lost,
        };
        let error = match (result.status, result.error) {
            (JobStatus::Refused, Some(e)) => Some(format!("refused by the agent: {e}")),
            (_, e) => e,
        };
        if state == JobState::Lost {
            let why = error.unwrap_or_else(|| "interrupted on the node".into());
            self.lose_locked(&mut t, id, why);
            return;
        }
        self.finish_locked(&mut t, id, state, |r| {
            r.exit_code = result.exit_code;
            r.error = error;
            r.output = match result.output {
                nebula_protocol::jobs::JobOutput::None => None,
                o => Some(o),
            };
        });
    }

    /// A model's answer (an `infer` job) goes through the gateway's output filters before it
    /// is stored, as it would on its way to a client: what the filters redact or block is never
    /// kept. The rules that matched are added to the answer as `nebula_filtered`.
    fn filter_model_answer(&self, id: Uuid, result: &mut JobResult) {
        let nebula_protocol::jobs::JobOutput::Http(h) = &mut result.output else {
            return;
        };
        if !self.ai.filters.active() {
            return;
        }
        let (who, node) = {
            let t = self.jobs.lock();
            match t.active.get(&id) {
                Some(a) if matches!(a.rec.work, super::Work::Infer { .. }) => (
                    a.rec.created_by.clone(),
                    a.rec.node.clone().unwrap_or_default(),
                ),
                _ => return,
            }
        };
        let Some((body, hits)) = nebula_ai_filters::filter_answer(&self.ai.filters, &h.body) else {
            return;
        };
        h.body = body;
        for hit in &hits {
            self.audit(
                &who,
                "ai.filter",
                &format!("job {id}"),
                serde_json::json!({"rule": hit.rule, "action": hit.action, "sample": hit.sample, "node": node}),
            );
        }
    }

    /// The job is lost on its node: retry it if it may be, else end it as `lost`.
    pub(super) fn lose_locked(&self, t: &mut TableInner, id: Uuid, why: String) {
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        let node = a.rec.node.clone().unwrap_or_default();
        if a.rec.idempotent && a.rec.attempt < a.rec.max_attempts && a.cancel.is_none() {
            let from = a.rec.state;
            warn!(job = %id, %node, attempt = a.rec.attempt, "job lost ({why}); retrying");
            // Record the loss, then the retry.
            a.rec.state = JobState::Lost;
            a.rec.reason = Some(format!("attempt {} lost on {node}: {why}", a.rec.attempt));
            self.jobs.persist_quietly(a, Some(from));
            if let Some(n) = a.rec.node_id {
                if !a.rec.excluded.contains(&n) {
                    a.rec.excluded.push(n);
                }
            }
            let TableInner {
                active, in_flight, ..
            } = &mut *t;
            let Some(a) = active.get_mut(&id) else {
                return;
            };
            release(in_flight, a);
            a.rec.state = JobState::Queued;
            a.rec.attempt += 1;
            a.rec.node_id = None;
            a.rec.node = None;
            a.rec.dispatched_at = None;
            a.rec.started_at = None;
            a.rec.routing = None;
            a.rec.logs_next = 0;
            a.rec.reason = Some(format!(
                "retrying (attempt {} of {}) after attempt {} was lost on {node}: {why}",
                a.rec.attempt,
                a.rec.max_attempts,
                a.rec.attempt - 1
            ));
            a.stream = None;
            a.lease_until = None;
            self.jobs.persist(a, Some(JobState::Lost));
            self.jobs.kick_fresh(t, id);
        } else {
            warn!(job = %id, %node, "job lost: {why}");
            let reason = format!("lost on {node}: {why}");
            self.finish_locked(t, id, JobState::Lost, |r| r.reason = Some(reason));
        }
    }

    /// A stream task ended without a result: the job waits for its node to come back.
    pub(crate) fn job_detached(&self, id: Uuid, attempt: u32, why: &str) {
        let mut t = self.jobs.lock();
        if let Some(a) = t.active.get_mut(&id) {
            if a.rec.attempt == attempt && !a.rec.state.is_terminal() {
                debug!(job = %id, "job stream ended without a result ({why}); waiting for the node");
                a.stream = None;
                a.lease_until = Some(Instant::now() + self.config.job_lost_grace);
            }
        }
        drop(t);
        self.jobs.kick();
    }

    /// The agent acknowledged or started the job.
    pub(crate) fn job_progress(&self, id: Uuid, attempt: u32, started: bool) {
        let mut t = self.jobs.lock();
        if let Some(a) = t.active.get_mut(&id) {
            if a.rec.attempt != attempt {
                return;
            }
            a.lease_until = None;
            if started && a.rec.state != JobState::Running {
                let from = a.rec.state;
                a.rec.state = JobState::Running;
                a.rec.started_at.get_or_insert(UnixMillis::now().as_i64());
                self.jobs.persist(a, Some(from));
            }
        }
    }

    /// The agent's progress figure for a running job.
    pub(crate) fn job_percent(&self, id: Uuid, attempt: u32, percent: f32, message: String) {
        let node = {
            let mut t = self.jobs.lock();
            let Some(a) = t.active.get_mut(&id) else {
                return;
            };
            if a.rec.attempt != attempt {
                return;
            }
            a.progress = Some((percent, message.clone()));
            a.rec.node.clone()
        };
        self.events.publish(crate::events::Event::JobProgress {
            id,
            node,
            permille: (percent.clamp(0.0, 100.0) * 10.0).round() as u16,
            message,
        });
    }

    /// Model jobs not finished yet: id, node, what, latest progress (percent, message).
    pub fn model_jobs_in_flight(&self) -> Vec<ModelJobInFlight> {
        let t = self.jobs.lock();
        t.active
            .values()
            .filter_map(|a| match &a.rec.work {
                Work::Model {
                    action, name, file, ..
                } => Some((
                    a.rec.id,
                    a.rec.node.clone().or_else(|| match &a.rec.target {
                        Target::Node(n) => Some(n.clone()),
                        _ => None,
                    }),
                    format!(
                        "{} {}",
                        serde_json::to_value(action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        name.clone().or_else(|| file.clone()).unwrap_or_default()
                    ),
                    a.progress.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The latest progress of a job still running.
    pub fn job_progress_of(&self, id: Uuid) -> Option<(f32, String)> {
        self.jobs.lock().active.get(&id)?.progress.clone()
    }

    /// Log lines from the agent.
    pub(crate) fn job_logs(
        &self,
        id: Uuid,
        attempt: u32,
        lines: Vec<nebula_protocol::jobs::LogLine>,
    ) {
        let mut t = self.jobs.lock();
        let Some(a) = t.active.get_mut(&id) else {
            return;
        };
        if a.rec.attempt != attempt {
            return;
        }
        for l in lines {
            if l.seq < a.rec.logs_next {
                continue;
            }
            a.rec.logs_next = l.seq + 1;
            let line = JobLogLine {
                attempt,
                seq: l.seq,
                at: l.at_unix_ms,
                stream: l.stream.as_str().to_owned(),
                line: l.line,
            };
            if let Some(tx) = &a.logs {
                let _ = tx.send(line.clone());
            }
            a.recent.push_back(line.clone());
            if a.recent.len() > RECENT_LOGS {
                a.recent.pop_front();
            }
            self.jobs.write(Write::Log(id, line));
        }
    }
}
