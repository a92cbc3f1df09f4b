//! Interactive commands in containers: a stream to the agent ([`JobControl::Exec`]) that the
//! HTTP layer bridges to a WebSocket. Operators only, within the node's `docker.exec`. Every
//! session is audited when it opens (`container.exec`: who, where, what command) and when it
//! ends (`container.exec.end`: how long, the exit status), however it ends; keystrokes are not.
//!
//! [`JobControl::Exec`]: nebula_protocol::jobs::JobControl::Exec

use std::sync::Arc;
use std::time::{Duration, Instant};

use nebula_protocol::containers::{ExecInput, ExecOutput, ExecRequest, PolicyKey, EXEC_CHUNK};
use nebula_protocol::jobs::JobControl;
use nebula_protocol::{self as proto, FrameReader};

use crate::authz::{Change, Op, OpCtx};
use crate::{ControlPlane, OpError};

/// Interactive sessions open at once on this controller.
pub const MAX_EXEC_SESSIONS: usize = 64;

/// An open interactive session: its input and output halves, and the record that audits its
/// end when both are dropped.
pub struct ExecSession {
    pub input: ExecWriter,
    pub output: ExecReader,
}

/// The command's input and window size.
pub struct ExecWriter {
    send: quinn::SendStream,
    _end: Arc<EndRecord>,
}

/// The command's output and, last, its exit status.
pub struct ExecReader {
    recv: quinn::RecvStream,
    frames: FrameReader,
    end: Arc<EndRecord>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").finish()
    }
}

impl ExecWriter {
    /// Keystrokes or piped input (cut into frames of at most [`EXEC_CHUNK`] bytes).
    pub async fn data(&mut self, bytes: &[u8]) -> Result<(), String> {
        for chunk in bytes.chunks(EXEC_CHUNK) {
            self.send_input(ExecInput::Data(chunk.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), String> {
        self.send_input(ExecInput::Resize { rows, cols }).await
    }

    /// No more input.
    pub async fn eof(&mut self) -> Result<(), String> {
        self.send_input(ExecInput::Eof).await
    }

    async fn send_input(&mut self, input: ExecInput) -> Result<(), String> {
        proto::write_message(&mut self.send, &input)
            .await
            .map_err(|e| format!("the node's stream broke: {e}"))
    }
}

impl ExecReader {
    /// The next output; `Exit` (or an error) ends it.
    pub async fn next(&mut self) -> Result<ExecOutput, String> {
        match self
            .frames
            .read_message::<ExecOutput, _>(&mut self.recv)
            .await
        {
            Ok(out) => {
                if let ExecOutput::Exit { code } = &out {
                    *self.end.code.lock().unwrap_or_else(|p| p.into_inner()) = *code;
                }
                Ok(out)
            }
            Err(e) => Err(format!("the node's stream broke: {e}")),
        }
    }
}

/// Audits the session's end when the last half is dropped.
struct EndRecord {
    cp: Arc<ControlPlane>,
    cx: OpCtx,
    target: String,
    opened: Instant,
    code: std::sync::Mutex<Option<i64>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _busy: Option<crate::registry::Busy>,
}

impl Drop for EndRecord {
    fn drop(&mut self) {
        let code = *self.code.lock().unwrap_or_else(|p| p.into_inner());
        self.cp.record(
            &self.cx,
            Change {
                action: "container.exec.end",
                target: std::mem::take(&mut self.target),
                detail: serde_json::json!({
                    "duration_ms": self.opened.elapsed().as_millis() as u64,
                    "exit_code": code,
                }),
                event: None,
            },
        );
    }
}

impl ControlPlane {
    /// Start an interactive command in a container. Answers once the node has started it (or
    /// refused it: the refusal names the node's rule).
    pub async fn open_exec(
        self: &Arc<Self>,
        cx: &OpCtx,
        node: &str,
        req: ExecRequest,
    ) -> Result<ExecSession, OpError> {
        self.authorize(cx, Op::ExecContainer)?;
        if req.command.is_empty() || req.command.len() > 64 {
            return Err(OpError::Invalid("a command is 1 to 64 arguments".into()));
        }
        let reached = self
            .reach(node, &req.container, PolicyKey::Exec, &self.exec_sessions)
            .await?;
        let busy = reached.busy;
        let (conn, permit) = (
            reached.conn,
            reached.permit.ok_or_else(|| {
                OpError::TooManyRequests(format!(
                    "{MAX_EXEC_SESSIONS} interactive sessions are open already; try again later"
                ))
            })?,
        );
        let req = ExecRequest {
            container: reached.name,
            ..req
        };
        let target = format!("{node}/{}", req.container);
        let command = req.command.clone();
        let tty = req.tty;
        let opened = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            proto::write_message(&mut send, &JobControl::Exec(req))
                .await
                .map_err(|e| e.to_string())?;
            let mut frames = FrameReader::new(EXEC_CHUNK + 64);
            let first = frames
                .read_message::<ExecOutput, _>(&mut recv)
                .await
                .map_err(|e| format!("the node did not answer: {e}"))?;
            Ok::<_, String>((first, send, recv, frames))
        };
        let (first, send, recv, frames) = tokio::time::timeout(Duration::from_secs(15), opened)
            .await
            .map_err(|_| OpError::Conflict(format!("node `{node}` did not answer in time")))?
            .map_err(OpError::Conflict)?;
        match first {
            ExecOutput::Started => {}
            ExecOutput::Refused { message } => return Err(OpError::Forbidden(message)),
            ExecOutput::Error { message } if message.starts_with("no container") => {
                return Err(OpError::NotFound(message))
            }
            ExecOutput::Error { message } => return Err(OpError::Conflict(message)),
            other => {
                return Err(OpError::Conflict(format!(
                    "the node answered {other:?} before starting the command"
                )))
            }
        }
        self.record(
            cx,
            Change {
                action: "container.exec",
                target: target.clone(),
                detail: serde_json::json!({ "command": command, "tty": tty }),
                event: None,
            },
        );
        let end = Arc::new(EndRecord {
            cp: self.clone(),
            cx: cx.clone(),
            target,
            opened: Instant::now(),
            code: std::sync::Mutex::new(None),
            _permit: permit,
            _busy: busy,
        });
        Ok(ExecSession {
            input: ExecWriter {
                send,
                _end: end.clone(),
            },
            output: ExecReader { recv, frames, end },
        })
    }
}
