//! Containers: every container in the fleet, one container, actions on it, its log as
//! server-sent events, a terminal in it (WebSocket); a node's images and volumes, and prune.

use std::convert::Infallible;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use nebula_protocol::containers::{
    ContainerAction, ExecOutput, ExecRequest, LogEntry, LogsRequest,
};
use nebula_types::api::containers::{
    ContainerActionRequest, ContainerActionView, ContainerRow, ContainerView, PrunePreview,
    PruneRequest, PruneResult, StorageView,
};
use nebula_types::api::jobs::JobView;
use tokio::sync::mpsc;

use super::nodes::Page;
use super::prelude::*;
use super::telemetry::parse_since;
use crate::containers::exec::ExecSession;
use crate::containers::{ContainerFilter, LogFollow, FOLLOW_BUFFER};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ContainerQuery {
    node: Option<String>,
    /// `key=value`
    label: Option<String>,
    state: Option<String>,
    health: Option<String>,
    /// `true`: only containers Nebula manages; `false`: only the others.
    managed: Option<bool>,
    /// Case-insensitive search in node, name, image, id and service.
    q: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/containers`.
pub(super) async fn list_containers(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    query: Result<Query<ContainerQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<ContainerRow>>> {
    use nebula_protocol::telemetry::ContainerState;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(500);
    if limit == 0 || limit > 5000 {
        return Err(ApiError::bad_request("limit must be between 1 and 5000"));
    }
    if let Some(s) = q.state.as_deref() {
        if ContainerState::parse(s) == ContainerState::Unknown && s != "unknown" {
            return Err(ApiError::bad_request(format!(
                "state `{s}` is not a container state"
            )));
        }
    }
    if let Some(h) = q.health.as_deref() {
        if !["none", "starting", "healthy", "unhealthy"].contains(&h) {
            return Err(ApiError::bad_request(format!(
                "health `{h}`: use none, starting, healthy or unhealthy"
            )));
        }
    }
    let label = match q.label.as_deref() {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ApiError::bad_request("label filter reads key=value"))?,
        ),
        None => None,
    };
    if q.q.as_deref().is_some_and(|s| s.len() > 200) {
        return Err(ApiError::bad_request(
            "search `q` is at most 200 characters",
        ));
    }
    if let Some(n) = q.node.as_deref() {
        if cp.store.node_by_name(n).await?.is_none() {
            return Err(ApiError::not_found(format!("no node named `{n}`")));
        }
    }
    let filter = ContainerFilter {
        node: q.node,
        label,
        state: q.state,
        health: q.health,
        managed: q.managed,
        search: q.q,
    };
    let mut items: Vec<ContainerRow> = cp
        .containers(&who, &filter)?
        .into_iter()
        .filter(|r| {
            q.cursor
                .as_deref()
                .is_none_or(|cur| format!("{}/{}", r.node, r.name).as_str() > cur)
        })
        .take(limit + 1)
        .collect();
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|r| format!("{}/{}", r.node, r.name))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// `GET /api/v1/nodes/{name}/containers/{container}`.
pub(super) async fn get_container(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path((node, container)): Path<(String, String)>,
) -> ApiResult<Json<ContainerView>> {
    Ok(Json(cp.container(&who, &node, &container).await?))
}

/// `POST /api/v1/nodes/{name}/containers/{container}/actions`: 202 with the job and, for a
/// container Nebula manages, a warning.
pub(super) async fn container_action(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path((node, container)): Path<(String, String)>,
    body: Result<Json<ContainerActionRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body?;
    let action = ContainerAction::parse(&b.action).ok_or_else(|| {
        ApiError::bad_request(format!(
            "action `{}`: use start, stop, restart, kill, remove or pull",
            b.action
        ))
    })?;
    let (record, warning) = cp.container_action(&who, &node, &container, action).await?;
    let view = ContainerActionView {
        job: JobView {
            record,
            progress: None,
        },
        warning,
    };
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    /// Keep the stream open for new lines (default true).
    follow: Option<bool>,
    /// The last N lines of what is there now.
    tail: Option<u32>,
    /// RFC 3339 time or a duration back from now (`10m`).
    since: Option<String>,
}

/// `GET /api/v1/nodes/{name}/containers/{container}/logs`: server-sent events. `logs` events
/// carry a JSON array of lines; `end` says the log ended; `error` says why it broke off.
pub(super) async fn container_logs(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path((node, container)): Path<(String, String)>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since_unix_ms = match q.since.as_deref() {
        Some(s) => Some(crate::store::millis(parse_since(Some(s))?)),
        None => None,
    };
    let req = LogsRequest {
        container,
        since_unix_ms,
        tail: q.tail,
        follow: q.follow.unwrap_or(true),
    };
    let follow = cp.follow_logs(&who, &node, req).await?;
    Ok(log_events(&cp, follow))
}

/// A log follower as server-sent events (the API's and the dashboard's container pages both
/// read it). The task that reads the node's stream waits while the client is slow: see
/// [`crate::containers`] for the bound that keeps.
pub fn log_events(
    cp: &ControlPlane,
    mut follow: LogFollow,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<SseEvent>(FOLLOW_BUFFER);
    let shutdown = cp.shutdown.clone();
    cp.tracker.spawn(async move {
        loop {
            let next = tokio::select! {
                n = follow.next() => n,
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            };
            let event = match next {
                Ok(Some(lines)) => SseEvent::default().event("logs").data(lines_json(&lines)),
                Ok(None) => {
                    let _ = tx.send(SseEvent::default().event("end").data("{}")).await;
                    return;
                }
                Err(message) => {
                    let body = serde_json::json!({ "message": message });
                    let _ = tx
                        .send(SseEvent::default().event("error").data(body.to_string()))
                        .await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok(ev), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A batch as the JSON array of [`ContainerLogLine`]s, written straight from the agent's
/// entries (no copy of each line, no string per timestamp: this runs for every line).
fn lines_json(lines: &[LogEntry]) -> String {
    #[derive(serde::Serialize)]
    struct LineRef<'a> {
        #[serde(serialize_with = "millis_rfc3339")]
        t: i64,
        stream: &'static str,
        line: &'a str,
    }
    fn millis_rfc3339<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        let t = crate::store::from_millis(*ms);
        s.collect_str(&humantime::format_rfc3339_millis(t))
    }
    let refs: Vec<LineRef<'_>> = lines
        .iter()
        .map(|l| LineRef {
            t: l.at_unix_ms,
            stream: l.stream.as_str(),
            line: &l.line,
        })
        .collect();
    serde_json::to_string(&refs).unwrap_or_else(|_| "[]".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecQuery {
    /// The command as shell words (`sh -c 'echo hi'`); default `sh`.
    cmd: Option<String>,
    /// Allocate a terminal (default true).
    tty: Option<bool>,
    rows: Option<u16>,
    cols: Option<u16>,
}

/// The command and terminal an exec asks for, read from its query.
pub fn exec_request(
    container: String,
    cmd: Option<&str>,
    tty: Option<bool>,
    rows: Option<u16>,
    cols: Option<u16>,
) -> Result<ExecRequest, ApiError> {
    let command = match cmd.map(str::trim).filter(|c| !c.is_empty()) {
        Some(c) => shlex::split(c)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::bad_request(format!("`cmd` is not shell words: {c}")))?,
        None => vec!["sh".to_owned()],
    };
    Ok(ExecRequest {
        container,
        command,
        tty: tty.unwrap_or(true),
        rows: rows.unwrap_or(24).clamp(1, 1000),
        cols: cols.unwrap_or(80).clamp(1, 1000),
    })
}

/// `GET /api/v1/nodes/{name}/containers/{container}/exec`: a WebSocket. Binary messages from
/// the client are the command's input; text messages are `{"resize":{"rows":R,"cols":C}}` or
/// `{"eof":true}`. Binary messages to the client are output, the first byte saying which
/// stream (1 stdout, 2 stderr); the last text message is `{"exit":CODE}` or `{"error":"..."}`.
pub(super) async fn container_exec(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path((node, container)): Path<(String, String)>,
    query: Result<Query<ExecQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!(
            "this endpoint speaks WebSocket only ({})",
            e.body_text()
        ))
    })?;
    let req = exec_request(container, q.cmd.as_deref(), q.tty, q.rows, q.cols)?;
    let session = cp.open_exec(&who, &node, req).await?;
    Ok(ws.on_upgrade(move |socket| exec_bridge(socket, session)))
}

/// What a client sends as text on an exec socket.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ClientControl {
    Resize { rows: u16, cols: u16 },
    Eof(bool),
}

/// Carry an exec session over a WebSocket (the API's and the dashboard's terminals) until the
/// command exits or the client goes away.
pub async fn exec_bridge(socket: WebSocket, session: ExecSession) {
    use futures::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = socket.split();
    let ExecSession {
        mut input,
        mut output,
    } = session;
    let to_node = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let sent = match msg {
                Message::Binary(b) => input.data(&b).await,
                Message::Text(t) => match serde_json::from_str::<ClientControl>(t.as_str()) {
                    Ok(ClientControl::Resize { rows, cols }) => {
                        input.resize(rows.clamp(1, 1000), cols.clamp(1, 1000)).await
                    }
                    Ok(ClientControl::Eof(true)) => input.eof().await,
                    Ok(ClientControl::Eof(false)) | Err(_) => Ok(()),
                },
                Message::Close(_) => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    };
    let to_client = async move {
        loop {
            let (msg, last) = match output.next().await {
                Ok(ExecOutput::Stdout(b)) => (Message::Binary(tagged(1, &b)), false),
                Ok(ExecOutput::Stderr(b)) => (Message::Binary(tagged(2, &b)), false),
                Ok(ExecOutput::Exit { code }) => (text(json!({ "exit": code })), true),
                Ok(ExecOutput::Started) => continue,
                Ok(ExecOutput::Error { message } | ExecOutput::Refused { message })
                | Err(message) => (text(json!({ "error": message })), true),
            };
            if ws_tx.send(msg).await.is_err() {
                return;
            }
            if last {
                let _ = ws_tx.send(Message::Close(None)).await;
                return;
            }
        }
    };
    // The session ends when the command does, or when the client goes away (its input then
    // ends on the node).
    tokio::select! {
        _ = to_client => {}
        _ = to_node => {}
    }
}

fn tagged(stream: u8, bytes: &[u8]) -> axum::body::Bytes {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(stream);
    v.extend_from_slice(bytes);
    v.into()
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

/// `GET /api/v1/nodes/{name}/storage`.
pub(super) async fn node_storage(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(node): Path<String>,
) -> ApiResult<Json<StorageView>> {
    Ok(Json(cp.node_storage(&who, &node).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreviewQuery {
    /// List unused volumes too (they hold data).
    volumes: Option<bool>,
    /// Only images whose tag or id, and volumes whose name, contain this.
    #[serde(rename = "match")]
    matching: Option<String>,
}

/// `GET /api/v1/nodes/{name}/storage/prune`: what a prune would remove now.
pub(super) async fn prune_preview(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(node): Path<String>,
    query: Result<Query<PreviewQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<PrunePreview>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(
        cp.prune_preview(
            &who,
            &node,
            q.volumes.unwrap_or(false),
            q.matching.as_deref().filter(|m| !m.is_empty()),
        )
        .await?,
    ))
}

/// `POST /api/v1/nodes/{name}/storage/prune`: remove exactly what the body names.
pub(super) async fn prune(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    Path(node): Path<String>,
    body: Result<Json<PruneRequest>, JsonRejection>,
) -> ApiResult<Json<PruneResult>> {
    let Json(req) = body?;
    Ok(Json(cp.prune(&who, &node, req).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_protocol::jobs::LogStream;
    use nebula_types::api::containers::ContainerLogLine;

    #[test]
    fn a_batch_reads_back_as_the_api_type() {
        let lines = vec![
            LogEntry {
                at_unix_ms: 1_796_568_001_123,
                stream: LogStream::Stdout,
                line: "tick \"1\"\n\u{1b}[0m".into(),
            },
            LogEntry {
                at_unix_ms: 0,
                stream: LogStream::Stderr,
                line: String::new(),
            },
        ];
        let back: Vec<ContainerLogLine> = serde_json::from_str(&lines_json(&lines)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].t, "2026-12-06T14:40:01.123Z");
        assert_eq!(back[0].line, lines[0].line);
        assert_eq!(back[1].stream, "stderr");
        assert_eq!(back[1].t, "1970-01-01T00:00:00.000Z");
    }
}
