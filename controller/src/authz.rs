//! Authorization in one place. Every control-plane operation takes an [`OpCtx`] (who asks,
//! through which front end, with which role, under which request id) and calls
//! [`ControlPlane::authorize`] before it does anything; the policy itself is one table,
//! [`Op::needs`]. Front ends only authenticate (an API token, a dashboard session) and render:
//! the same viewer is refused by the same check whichever way they come in. Authentication's
//! shared pieces (the bearer token, the gateway-only role) live here too.

use serde::Serialize;
use uuid::Uuid;

pub use nebula_types::auth::{Op, Role};

use crate::{ControlPlane, OpError};

/// The role of API tokens that may use the AI gateway and nothing else.
pub const AI_ROLE: &str = "ai";
/// The role of API tokens a Discord bot running elsewhere uses: each request acts for the
/// Discord user its `x-nebula-discord-*` headers name, with the role the control plane gives
/// that user ([`ControlPlane::discord_principal`]), never a role of its own.
pub const BOT_ROLE: &str = "bot";

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The front end an operation came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Api,
    Dashboard,
    /// The Discord bot (the audit detail names the Discord user and server).
    Discord,
    /// The controller itself (the reconciler, the gateway's pull on demand, wake-ups).
    Internal,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Api => "api",
            Via::Dashboard => "dashboard",
            Via::Discord => "discord",
            Via::Internal => "internal",
        }
    }
}

/// Who asks for an operation.
#[derive(Debug, Clone)]
pub struct OpCtx {
    /// The user or token name, as the audit log records it.
    pub actor: String,
    pub role: Role,
    pub via: Via,
    /// Ties the audit row and the logs of one request together.
    pub request_id: Uuid,
    /// Where the request came from beyond the front end, added to every audit row it makes
    /// (the Discord bot: `{"discord": {"user", "name", "guild"}}`).
    pub origin: Option<serde_json::Map<String, serde_json::Value>>,
}

impl OpCtx {
    pub fn new(actor: impl Into<String>, role: Role, via: Via) -> Self {
        Self {
            actor: actor.into(),
            role,
            via,
            request_id: Uuid::now_v7(),
            origin: None,
        }
    }

    /// Whether its role allows `op` (nothing is counted or logged: for what a view shows).
    pub fn may(&self, op: Op) -> bool {
        permits(self.role, op).is_ok()
    }

    /// The controller acting on its own behalf (`actor` names the part: `reconciler`).
    pub fn internal(actor: impl Into<String>) -> Self {
        Self::new(actor, Role::Admin, Via::Internal)
    }
}

impl ControlPlane {
    /// May `cx` do `op`? A refusal is counted (`nebula_operations_refused_total`) and says
    /// which role the operation needs.
    pub fn authorize(&self, cx: &OpCtx, op: Op) -> Result<(), OpError> {
        let Err(refused) = permits(cx.role, op) else {
            return Ok(());
        };
        self.metrics
            .refused_ops
            .get_or_create(&vec![("op", op.as_str()), ("via", cx.via.as_str())])
            .inc();
        tracing::info!(
            actor = %cx.actor,
            via = cx.via.as_str(),
            op = op.as_str(),
            request = %cx.request_id,
            "operation refused: the {} role does not allow it",
            cx.role.as_str()
        );
        Err(refused)
    }
}

/// Does `role` allow `op`? The one rule [`ControlPlane::authorize`] applies (a bot in its own
/// process asks it before offering a confirmation; the controller judges again when it runs).
pub fn permits(role: Role, op: Op) -> Result<(), OpError> {
    let needs = op.needs();
    if role >= needs {
        Ok(())
    } else {
        Err(OpError::Forbidden(format!(
            "this action needs the {needs:?} role"
        )))
    }
}

/// A state change as the audit log and the event bus see it. [`ControlPlane::record`] writes
/// both from one value, so a change is never audited without its event or published without
/// its audit row.
#[derive(Debug, Clone)]
pub struct Change {
    /// `token.create`, `map.apply`, ...
    pub action: &'static str,
    pub target: String,
    pub detail: serde_json::Value,
    /// What subscribers hear. `None` only where the job engine publishes the change itself
    /// (a job's own state events).
    pub event: Option<crate::events::Event>,
}

impl ControlPlane {
    /// Audit `change` as done by `cx` (with the front end and request id in its detail) and
    /// publish its event.
    pub fn record(&self, cx: &OpCtx, change: Change) {
        let mut detail = change.detail;
        if let Some(d) = detail.as_object_mut() {
            d.insert("via".into(), cx.via.as_str().into());
            d.insert("request".into(), cx.request_id.to_string().into());
            if let Some(origin) = &cx.origin {
                d.extend(origin.clone());
            }
        }
        self.audit(&cx.actor, change.action, &change.target, detail);
        if let Some(event) = change.event {
            self.events.publish(event);
        }
    }
}
