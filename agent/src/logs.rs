//! A container's log, followed on a stream the controller opens ([`JobControl::Logs`]): the
//! runtime's log API read with timestamps, cut into lines, sent as batches of at most
//! [`LOG_BATCH_LINES`] lines or [`LOG_BATCH_BYTES`] bytes.
//!
//! Memory is bounded by one batch: the next chunk is read from the runtime only once the last
//! batch is written to the stream, so a slow reader at the other end slows only this stream
//! (QUIC flow control stops the write, which stops the read). The container is never slowed:
//! the runtime writes its log to disk whoever reads it. The stream ends when the controller
//! stops reading it, when the log ends (not following, or the container stopped), or when
//! the agent stops.
//!
//! [`JobControl::Logs`]: nebula_protocol::jobs::JobControl::Logs

use std::time::UNIX_EPOCH;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures::{FutureExt, StreamExt};
use nebula_protocol::containers::{
    policy_refusal, valid_container_ref, LogEntry, LogEvent, LogsRequest, PolicyKey,
    LOG_BATCH_BYTES, LOG_BATCH_LINES,
};
use nebula_protocol::jobs::{LogStream, MAX_LOG_LINE};
use nebula_protocol::{self as proto, FrameError};
use tracing::debug;

use crate::config::DockerConfig;

/// Serve one log stream until it ends (see the module doc).
pub async fn serve(
    req: LogsRequest,
    mut send: quinn::SendStream,
    policy: &DockerConfig,
    node_id: Option<uuid::Uuid>,
) {
    let result = follow(&req, &mut send, policy, node_id).await;
    let last = match result {
        Ok(()) => LogEvent::End,
        Err(Ended::Gone) => return,
        Err(Ended::Error(message)) => LogEvent::Error { message },
        Err(Ended::Refused(message)) => LogEvent::Refused { message },
    };
    if proto::write_message(&mut send, &last).await.is_ok() {
        let _ = send.finish();
    }
}

enum Ended {
    /// The controller stopped reading: nothing more to say.
    Gone,
    Error(String),
    /// The node's `docker.logs` rule says no.
    Refused(String),
}

impl From<FrameError> for Ended {
    fn from(_: FrameError) -> Self {
        Ended::Gone
    }
}

async fn follow(
    req: &LogsRequest,
    send: &mut quinn::SendStream,
    policy: &DockerConfig,
    node_id: Option<uuid::Uuid>,
) -> Result<(), Ended> {
    let name = &req.container;
    if !valid_container_ref(name) {
        return Err(Ended::Error(format!(
            "`{name}` is not a container name or id"
        )));
    }
    let docker = crate::docker::connect(policy.socket.as_deref())
        .map_err(|e| Ended::Error(format!("no container runtime reachable: {e}")))?;
    let found = crate::docker::find(&docker, name, node_id)
        .await
        .map_err(Ended::Error)?;
    if let Some(refusal) = policy_refusal(PolicyKey::Logs, policy.logs, name, found.managed) {
        return Err(Ended::Refused(refusal));
    }
    // Accepted: say so at once, so that the controller can answer its client before the
    // container writes anything.
    proto::write_message(send, &LogEvent::Lines(Vec::new())).await?;
    let since_ms = req.since_unix_ms.filter(|ms| *ms > 0);
    let opts = LogsOptions {
        follow: req.follow,
        stdout: true,
        stderr: true,
        // Whole seconds here; the cut to the millisecond is below.
        since: since_ms
            .map(|ms| i32::try_from(ms / 1000).unwrap_or(i32::MAX))
            .unwrap_or(0),
        until: 0,
        timestamps: true,
        tail: req
            .tail
            .map(|n| n.to_string())
            .unwrap_or_else(|| "all".into()),
    };
    let mut logs = docker.logs(name, Some(opts));
    let mut batch = Batch::default();
    let mut frame = Vec::with_capacity(LOG_BATCH_BYTES + 1024);
    loop {
        // Wait for the next chunk, or for the controller to stop reading.
        let next = tokio::select! {
            next = logs.next() => next,
            _ = send.stopped() => return Err(Ended::Gone),
        };
        let Some(item) = next else { break };
        batch.take(item, since_ms)?;
        // Whatever else is ready now joins the batch, up to its bounds.
        while !batch.full() {
            match logs.next().now_or_never() {
                Some(Some(item)) => batch.take(item, since_ms)?,
                Some(None) => {
                    batch.send(send, &mut frame).await?;
                    return Ok(());
                }
                None => break,
            }
        }
        batch.send(send, &mut frame).await?;
    }
    batch.send(send, &mut frame).await?;
    Ok(())
}

#[derive(Default)]
struct Batch {
    lines: Vec<LogEntry>,
    bytes: usize,
    /// The last timestamp seen (for a chunk that carries none).
    last_ms: i64,
}

impl Batch {
    fn full(&self) -> bool {
        self.lines.len() >= LOG_BATCH_LINES || self.bytes >= LOG_BATCH_BYTES
    }

    fn take(
        &mut self,
        item: Result<LogOutput, bollard::errors::Error>,
        since_ms: Option<i64>,
    ) -> Result<(), Ended> {
        let (stream, message) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                (LogStream::Stdout, message)
            }
            Ok(LogOutput::StdErr { message }) => (LogStream::Stderr, message),
            Ok(LogOutput::StdIn { .. }) => return Ok(()),
            Err(e) => return Err(Ended::Error(format!("reading the log: {e}"))),
        };
        for raw in message.split(|b| *b == b'\n') {
            if raw.is_empty() {
                continue;
            }
            let (at, text) = split_timestamp(raw);
            let at = at.unwrap_or(self.last_ms);
            self.last_ms = at;
            if since_ms.is_some_and(|s| at < s) {
                continue;
            }
            let line = cut(text);
            self.bytes += line.len() + 16;
            self.lines.push(LogEntry {
                at_unix_ms: at,
                stream,
                line,
            });
        }
        Ok(())
    }

    async fn send(
        &mut self,
        send: &mut quinn::SendStream,
        frame: &mut Vec<u8>,
    ) -> Result<(), Ended> {
        if self.lines.is_empty() {
            return Ok(());
        }
        frame.clear();
        let event = LogEvent::Lines(std::mem::take(&mut self.lines));
        self.bytes = 0;
        proto::encode_frame_into(&event, frame)?;
        send.write_all(frame).await.map_err(|e| {
            debug!("log stream closed: {e}");
            Ended::Gone
        })?;
        if let LogEvent::Lines(mut v) = event {
            // Keep the allocation for the next batch.
            v.clear();
            self.lines = v;
        }
        Ok(())
    }
}

/// `2026-12-06T14:40:01.123456789Z text` → (Unix ms, text). A chunk without a timestamp
/// (a long line's continuation) is all text.
fn split_timestamp(raw: &[u8]) -> (Option<i64>, &[u8]) {
    let Some(space) = raw.iter().position(|b| *b == b' ').filter(|p| *p <= 40) else {
        return (None, trim_cr(raw));
    };
    let at = std::str::from_utf8(&raw[..space])
        .ok()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64);
    match at {
        Some(ms) => (Some(ms), trim_cr(&raw[space + 1..])),
        None => (None, trim_cr(raw)),
    }
}

fn trim_cr(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// Lossy UTF-8, NUL bytes replaced, cut at the protocol's line limit.
fn cut(b: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&b[..b.len().min(MAX_LOG_LINE)]).into_owned();
    if s.contains('\0') {
        s = s.replace('\0', "\u{FFFD}");
    }
    if b.len() > MAX_LOG_LINE {
        s.push_str(" [line cut]");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_read_and_lines_split() {
        let (at, text) = split_timestamp(b"2026-12-06T14:40:01.123456789Z hello world\r");
        assert_eq!(text, b"hello world");
        assert_eq!(at, Some(1_796_568_001_123));
        let (at, text) = split_timestamp(b"no timestamp here");
        assert_eq!((at, text), (None, &b"no timestamp here"[..]));
        let mut b = Batch::default();
        let msg: &'static [u8] = b"2026-12-06T14:40:01.000Z one\n2026-12-06T14:40:02.000Z two\n";
        b.take(
            Ok(LogOutput::StdErr {
                message: msg.into(),
            }),
            Some(1_796_568_001_500),
        )
        .ok()
        .unwrap();
        assert_eq!(b.lines.len(), 1, "the line before `since` is left out");
        assert_eq!(b.lines[0].line, "two");
        assert_eq!(b.lines[0].stream, LogStream::Stderr);
    }

    #[test]
    fn long_lines_are_cut_and_marked() {
        let long = vec![b'x'; MAX_LOG_LINE + 10];
        let s = cut(&long);
        assert!(s.ends_with(" [line cut]"));
        assert_eq!(s.len(), MAX_LOG_LINE + " [line cut]".len());
        assert_eq!(cut(b"a\0b"), "a\u{FFFD}b");
    }
}
