//! One job's stream: open it on the node's connection, send the request, follow the agent's
//! events until the result, pass cancels along.
//!
//! A deploy's secret references are resolved here and nowhere else: the request that goes on
//! the stream carries the values, and whatever comes back (log lines, progress, the result)
//! has them replaced by their references before it is kept.

use std::sync::Arc;
use std::time::Duration;

use nebula_protocol::jobs::{JobControl, JobEvent, JobRequest, JobResult, JobStatus};
use nebula_protocol::{self as proto, FrameError};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::ControlPlane;

/// How long the agent has to acknowledge a request.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) async fn run(
    cp: Arc<ControlPlane>,
    conn: crate::transport::Link,
    req: JobRequest,
    fenced: bool,
    mut cancel: mpsc::UnboundedReceiver<String>,
) {
    let (id, attempt) = (req.id, req.attempt);
    let span = tracing::debug_span!("job", %id, attempt);
    let why = follow(&cp, &conn, req, fenced, &mut cancel)
        .instrument(span)
        .await;
    if let Err(why) = why {
        cp.job_detached(id, attempt, &why);
    }
}

/// Ok: the result arrived and was handed over. Err: the stream ended without one.
async fn follow(
    cp: &ControlPlane,
    conn: &crate::transport::Link,
    req: JobRequest,
    fenced: bool,
    cancel: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let (id, attempt) = (req.id, req.attempt);
    let mut req = req;
    let redact = match cp.expand_secrets(&mut req.spec).await {
        Ok(r) => r,
        Err(why) => {
            // Nothing was sent: the job fails here, saying which secret is missing.
            let why = format!("cannot resolve the deploy's secrets: {why}");
            cp.job_finished(id, attempt, JobResult::new(JobStatus::Failed, Some(why)));
            return Ok(());
        }
    };
    // A replica whose lease may have run out (it was paused, or could not renew) sends
    // nothing: the next leader delivers the job from the store. The term is read with that
    // check: a step-down while the stream opens cannot make the job go without it.
    let term = cp.ha.term();
    if !cp.ha.lease_valid() || (cp.ha.replicated() && term.is_none()) {
        return Err("this replica's leadership ran out before the job was sent".into());
    }
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("opening the job stream: {e}"))?;
    // With the term this replica leads in (on PostgreSQL): the agent refuses a lower one.
    let term = term.filter(|_| fenced);
    let control = match term {
        Some(term) => JobControl::Fenced {
            term: u64::try_from(term).unwrap_or_default(),
            request: req,
        },
        None => JobControl::Request(req),
    };
    let frame = proto::encode_frame(&control).map_err(|e| e.to_string())?;
    let redacting = !redact.is_empty();
    send.write_all(&frame)
        .await
        .map_err(|e| format!("sending the job: {e}"))?;
    let mut frames = proto::FrameReader::new(cp.config.max_frame_bytes);
    let mut acknowledged = false;
    let mut cancels_open = true;
    let ack_deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
    loop {
        let ev = tokio::select! {
            reason = cancel.recv(), if cancels_open => {
                match reason {
                    Some(reason) => {
                        let frame = proto::encode_frame(&JobControl::Cancel { reason })
                            .map_err(|e| e.to_string())?;
                        send.write_all(&frame).await.map_err(|e| format!("sending cancel: {e}"))?;
                    }
                    None => cancels_open = false,
                }
                continue;
            }
            _ = tokio::time::sleep_until(ack_deadline), if !acknowledged => {
                let _ = send.reset(0u32.into());
                return Err(format!("no acknowledgement within {}s", ACK_TIMEOUT.as_secs()));
            }
            ev = frames.read_message::<JobEvent, _>(&mut recv) => ev,
        };
        match ev {
            Ok(JobEvent::Accepted { resumed }) => {
                acknowledged = true;
                if resumed {
                    debug!("the agent already had this job; following it");
                }
                cp.job_progress(id, attempt, false);
            }
            Ok(JobEvent::Started) => cp.job_progress(id, attempt, true),
            Ok(JobEvent::Log(mut line)) => {
                if redacting {
                    line.line = redact.apply(&line.line);
                }
                cp.job_logs(id, attempt, vec![line])
            }
            Ok(JobEvent::Progress { percent, message }) => {
                cp.job_percent(id, attempt, percent, redact.apply(&message))
            }
            Ok(JobEvent::Finished(mut result)) => {
                if redacting {
                    result = redact_result(&redact, result);
                }
                cp.job_finished(id, attempt, result);
                let _ = send.finish();
                return Ok(());
            }
            Err(FrameError::UnknownVariant { .. }) => {
                debug!("the agent sent a job event this controller does not know; ignored");
            }
            Err(e) => return Err(format!("job stream: {e}")),
        }
    }
}

/// A result with the values of the request's secrets replaced by their references.
fn redact_result(redact: &crate::secrets::refs::Redactions, result: JobResult) -> JobResult {
    let fallback = |r: &JobResult| {
        // Never the unredacted whole: its status, and its error redacted.
        JobResult::new(r.status, r.error.as_deref().map(|e| redact.apply(e)))
    };
    let Ok(mut v) = serde_json::to_value(&result) else {
        return fallback(&result);
    };
    redact.apply_json(&mut v);
    serde_json::from_value(v).unwrap_or_else(|_| fallback(&result))
}
