//! The writer task: the only writer of jobs, log lines and audit rows, in group commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::{Write, MAX_BATCH};
use crate::events::Event;
use crate::store::jobs::JobBatch;
use crate::ControlPlane;

/// The writer task: group commits until shutdown, then whatever is left.
pub async fn writer(cp: Arc<ControlPlane>, shutdown: CancellationToken) {
    let Some(mut rx) = cp
        .jobs
        .writes_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    let mut buf: Vec<(u64, Write)> = Vec::with_capacity(MAX_BATCH);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut buf, MAX_BATCH) => n,
            _ = shutdown.cancelled() => {
                // Drain what is queued (stream tasks may still report for a moment).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while let Ok(w) = rx.try_recv() {
                    buf.push(w);
                }
                commit(&cp, std::mem::take(&mut buf)).await;
                return;
            }
        };
        if got == 0 {
            return;
        }
        commit(&cp, std::mem::take(&mut buf)).await;
    }
}

async fn commit(cp: &ControlPlane, writes: Vec<(u64, Write)>) {
    // Queued before a take-over: the new leadership read the jobs from the store since.
    let epoch = cp.jobs.epoch();
    let before = writes.len();
    let writes: Vec<Write> = writes
        .into_iter()
        .filter(|(e, w)| *e == epoch || matches!(w, Write::Audit(_)))
        .map(|(_, w)| w)
        .collect();
    if writes.len() < before {
        warn!(
            dropped = before - writes.len(),
            "job writes queued before this replica took over were dropped"
        );
    }
    if writes.is_empty() {
        return;
    }
    let mut batch = JobBatch::default();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut after = Vec::new();
    for w in writes {
        match w {
            Write::Job {
                rec,
                from,
                watch,
                committed,
            } => {
                let rec = *rec;
                after.push((rec.clone(), from, watch, committed));
                match index.get(&rec.id) {
                    Some(&i) => batch.jobs[i] = rec,
                    None => {
                        index.insert(rec.id, batch.jobs.len());
                        batch.jobs.push(rec);
                    }
                }
            }
            Write::Log(id, line) => batch.logs.push((id, line)),
            Write::Audit(a) => batch.audit.push(a),
        }
    }
    let started = std::time::Instant::now();
    // Job states and log lines are the leader's (replicas on PostgreSQL): they carry its term,
    // and a replica that no longer leads has them refused (audit rows are anyone's).
    let fence = if batch.jobs.is_empty() && batch.logs.is_empty() {
        Ok(None)
    } else {
        cp.ha.fence().map_err(|e| e.to_string())
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let written = match &fence {
            Ok(f) => cp.store.write_job_batch_fenced(&batch, f.as_ref()).await,
            Err(why) => {
                refused(cp, batch, why).await;
                return;
            }
        };
        match written {
            Ok(()) => break,
            Err(e @ crate::store::StoreError::Fenced { .. }) => {
                refused(cp, batch, &e.to_string()).await;
                return;
            }
            Err(e) => {
                warn!(
                    jobs = batch.jobs.len(),
                    "writing jobs failed (retrying): {:#}",
                    anyhow::Error::from(e)
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    cp.metrics
        .store_write_seconds
        .observe(started.elapsed().as_secs_f64());
    cp.metrics.jobs_active.set(cp.jobs.active_count() as i64);
    for (rec, from, watch, committed) in after {
        if from != Some(rec.state) && rec.state.is_terminal() && watch.is_some() {
            cp.metrics
                .jobs_finished
                .get_or_create(&vec![("state", rec.state.as_str())])
                .inc();
        }
        if from != Some(rec.state) {
            cp.events.publish(Event::JobChanged {
                id: rec.id,
                kind: rec.work.kind().to_owned(),
                state: rec.state.as_str().to_owned(),
                node: rec.node.clone(),
            });
        }
        if let Some(w) = watch {
            w.send_replace(Arc::new(rec));
        }
        if let Some(c) = committed {
            c.send_replace(true);
        }
    }
}

/// A deposed leader's batch: its job states and log lines are dropped (the leader has the jobs
/// from the store and delivers them again; agents answer from their journals), its audit rows
/// still go in. Nobody waiting on these writes hears they were committed.
async fn refused(cp: &ControlPlane, batch: JobBatch, why: &str) {
    warn!(
        jobs = batch.jobs.len(),
        logs = batch.logs.len(),
        "job writes refused, this replica does not lead: {why}"
    );
    cp.metrics.job_writes_refused.inc();
    if batch.audit.is_empty() {
        return;
    }
    let audit = JobBatch {
        audit: batch.audit,
        ..JobBatch::default()
    };
    if let Err(e) = cp.store.write_job_batch(&audit).await {
        warn!("writing audit rows: {:#}", anyhow::Error::from(e));
    }
}
