//! The alerting operations every front end calls: what fires now, sinks, silences,
//! acknowledgement, the delivery history.

use std::time::Duration;

use nebula_alerts::{AlertState, Matcher};
use nebula_types::api::alerts::{
    AlertView, CreateSilence, CreateSink, CreatedSink, NotificationView, SilenceView, SinkView,
};
use uuid::Uuid;

use super::sinks;
use crate::authz::{Change, Op, OpCtx};
use crate::store::alerts::{SilenceRecord, SinkRecord};
use crate::{ControlPlane, OpError};

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

fn sink_view(s: &SinkRecord) -> SinkView {
    SinkView {
        name: s.name.clone(),
        kind: s.kind.clone(),
        url: s.url.clone(),
        min_severity: s.min_severity.clone(),
        filters: serde_json::from_str(&s.filters).unwrap_or_default(),
        created_by: s.created_by.clone(),
        created_at: rfc3339(s.created_at),
    }
}

fn silence_view(s: &SilenceRecord) -> SilenceView {
    let matchers: Vec<Matcher> = serde_json::from_str(&s.matchers).unwrap_or_default();
    SilenceView {
        id: s.id.clone(),
        matchers: matchers
            .iter()
            .map(|m| {
                format!(
                    "{}{}{}",
                    m.label,
                    if m.negate { "!=" } else { "=" },
                    m.value
                )
            })
            .collect(),
        starts_at: rfc3339(s.starts_at),
        ends_at: rfc3339(s.ends_at),
        created_by: s.created_by.clone(),
        comment: s.comment.clone(),
    }
}

fn now() -> i64 {
    nebula_protocol::time::UnixMillis::now().as_i64()
}

impl ControlPlane {
    /// Alerts pending and firing (and resolutions not sent yet), most severe first.
    pub async fn alerts_now(&self, cx: &OpCtx) -> Result<Vec<AlertView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        let t = now();
        let silences = super::engine_silences(&self.store.silences(t).await?);
        let mut out: Vec<AlertView> = self
            .alerts
            .current()
            .into_iter()
            .map(|a| AlertView {
                fingerprint: a.fingerprint(),
                silenced: silences
                    .iter()
                    .any(|s| s.active_at(t) && s.silences(&a.rule, &a.labels)),
                rule: a.rule,
                severity: format!("{:?}", a.severity).to_lowercase(),
                state: match a.state {
                    AlertState::Pending => "pending",
                    AlertState::Firing => "firing",
                    AlertState::Resolved => "resolved",
                }
                .into(),
                labels: a.labels,
                summary: a.summary,
                value: a.value,
                active_since: rfc3339(a.active_since),
                fired_at: a.fired_at.map(rfc3339),
                acknowledged_by: a.acknowledged_by,
            })
            .collect();
        out.sort_by(|a, b| {
            (b.state == "firing", &b.severity)
                .cmp(&(a.state == "firing", &a.severity))
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        Ok(out)
    }

    /// Acknowledge a firing alert: still shown, its resolution still sent, not repeated.
    pub async fn acknowledge_alert(&self, cx: &OpCtx, fingerprint: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        let done = {
            let mut state = self.alerts.lock();
            state
                .as_mut()
                .is_some_and(|s| s.acknowledge(fingerprint, &cx.actor))
        };
        if !done {
            return Err(OpError::NotFound(format!(
                "no firing alert `{fingerprint}`"
            )));
        }
        self.record(
            cx,
            Change {
                action: "alert.acknowledge",
                target: fingerprint.to_owned(),
                detail: serde_json::json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// Acknowledge through a link a sink sent (ntfy's button): the link's signature, made with
    /// the sink's secret, stands for the person it was sent to.
    pub async fn acknowledge_by_link(
        &self,
        sink: &str,
        fingerprint: &str,
        exp: i64,
        sig: &str,
    ) -> Result<(), OpError> {
        let sinks = self.store.sinks().await?;
        let refused = || OpError::Forbidden("this acknowledge link is not valid".into());
        let s = sinks.iter().find(|s| s.name == sink).ok_or_else(refused)?;
        let want = sinks::ack_signature(&s.secret, sink, fingerprint, exp);
        let same = want.len() == sig.len()
            && want
                .bytes()
                .zip(sig.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !same || exp < now() / 1000 {
            return Err(refused());
        }
        let cx = OpCtx::internal(format!("sink:{sink}"));
        self.acknowledge_alert(&cx, fingerprint).await
    }

    pub async fn sinks(&self, cx: &OpCtx) -> Result<Vec<SinkView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        Ok(self.store.sinks().await?.iter().map(sink_view).collect())
    }

    /// Add (or replace) a sink; its signing secret is returned once.
    pub async fn add_sink(&self, cx: &OpCtx, req: CreateSink) -> Result<CreatedSink, OpError> {
        self.authorize(cx, Op::ManageSinks)?;
        if !nebula_protocol::valid_name(&req.name) {
            return Err(OpError::Invalid(format!(
                "`{}` is not a sink name (letters, digits, `-_.`, at most 63)",
                req.name
            )));
        }
        let filters = &req.filters;
        let too_many = filters.rules.len()
            + filters.nodes.len()
            + filters.services.len()
            + filters.labels.len()
            > 100;
        if too_many {
            return Err(OpError::Invalid(
                "a sink's filters hold at most 100 entries".into(),
            ));
        }
        if !sinks::KINDS.contains(&req.kind.as_str()) && !self.alerts.has_channel(&req.kind) {
            return Err(OpError::Invalid(format!(
                "sink kind `{}`: webhook, ntfy, discord or email",
                req.kind
            )));
        }
        if req.kind == "email" {
            sinks::Smtp::parse(&req.url).map_err(OpError::Invalid)?;
        } else if self.alerts.has_channel(&req.kind) {
            // A channel (the Discord bot) reads its own address.
            if req.url.is_empty() || req.url.len() > 200 {
                return Err(OpError::Invalid("`url`: 1 to 200 characters".into()));
            }
        } else {
            let url = reqwest::Url::parse(&req.url)
                .map_err(|e| OpError::Invalid(format!("`url`: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(OpError::Invalid(format!(
                    "a {} sink's `url` is http or https",
                    req.kind
                )));
            }
        }
        let min_severity = req.min_severity.unwrap_or_else(|| "info".into());
        if sinks::parse_severity(&min_severity).is_none() {
            return Err(OpError::Invalid(format!(
                "`min_severity` is info, warning or critical, not `{min_severity}`"
            )));
        }
        let is_email = req.kind == "email";
        let rec = SinkRecord {
            name: req.name,
            kind: req.kind,
            url: req.url,
            // An e-mail sink's secret is its SMTP password; the others sign with one of ours.
            secret: match (req.password, is_email) {
                (Some(p), true) => p,
                _ => sinks::new_secret(),
            },
            min_severity,
            filters: serde_json::to_string(&req.filters).unwrap_or_else(|_| "{}".into()),
            created_by: cx.actor.clone(),
            created_at: now(),
        };
        self.store.put_sink(&rec).await?;
        self.record(
            cx,
            Change {
                action: "alert.sink.add",
                target: rec.name.clone(),
                detail: serde_json::json!({ "url": rec.url, "min_severity": rec.min_severity, "filters": req.filters }),
                event: None,
            },
        );
        Ok(CreatedSink {
            sink: sink_view(&rec),
            // A password given to us is not echoed back.
            secret: if rec.kind == "email" {
                String::new()
            } else {
                rec.secret
            },
        })
    }

    pub async fn remove_sink(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageSinks)?;
        if !self.store.delete_sink(name).await? {
            return Err(OpError::NotFound(format!("no sink named `{name}`")));
        }
        self.record(
            cx,
            Change {
                action: "alert.sink.remove",
                target: name.to_owned(),
                detail: serde_json::json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// Send a test message to a sink now; the receiver's answer is the result.
    pub async fn test_sink(&self, cx: &OpCtx, name: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        let id = format!("msg_{}", Uuid::now_v7().simple());
        let data = serde_json::json!({ "sink": name, "by": cx.actor });
        self.send_to_sink(name, &id, "alert.test", data)
            .await
            .map_err(|e| match e {
                OpError::Conflict(e) => {
                    OpError::Conflict(format!("the test message was not delivered: {e}"))
                }
                e => e,
            })
    }

    /// Send one message of type `kind` to a sink now, rendered for its kind (`data.title` and
    /// `data.text` are what people read); the receiver's answer is the result. `id` is the
    /// message's id (a webhook's `webhook-id`): the same id for a message sent again.
    pub async fn send_to_sink(
        &self,
        name: &str,
        id: &str,
        kind: &str,
        data: serde_json::Value,
    ) -> Result<(), OpError> {
        let sinks = self.store.sinks().await?;
        let sink = sinks
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| OpError::NotFound(format!("no sink named `{name}`")))?;
        let body = serde_json::json!({
            "type": kind,
            "timestamp": rfc3339(now()),
            "data": data,
        })
        .to_string();
        sinks::deliver_to(
            self.alerts.channel(&sink.kind),
            &self.http_client,
            sink,
            id,
            &body,
            self.config.public_url.as_deref(),
        )
        .await
        .map_err(OpError::Conflict)
    }

    pub async fn silences(&self, cx: &OpCtx) -> Result<Vec<SilenceView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        Ok(self
            .store
            .silences(now())
            .await?
            .iter()
            .map(silence_view)
            .collect())
    }

    pub async fn add_silence(
        &self,
        cx: &OpCtx,
        req: CreateSilence,
    ) -> Result<SilenceView, OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        if req.matchers.is_empty() || req.matchers.len() > 20 {
            return Err(OpError::Invalid("a silence has 1 to 20 matchers".into()));
        }
        let matchers = req
            .matchers
            .iter()
            .map(|m| Matcher::parse(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(OpError::Invalid)?;
        let duration = humantime::parse_duration(&req.duration)
            .map_err(|e| OpError::Invalid(format!("`duration`: {e}")))?;
        if duration.is_zero() || duration > Duration::from_secs(365 * 86_400) {
            return Err(OpError::Invalid(
                "a silence lasts between 1s and a year".into(),
            ));
        }
        if req.comment.len() > 1000 {
            return Err(OpError::Invalid("a comment is at most 1000 bytes".into()));
        }
        let t = now();
        let rec = SilenceRecord {
            id: Uuid::now_v7().to_string(),
            matchers: serde_json::to_string(&matchers).unwrap_or_else(|_| "[]".into()),
            starts_at: t,
            ends_at: t + i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 2),
            created_by: cx.actor.clone(),
            comment: req.comment,
            created_at: t,
        };
        self.store.add_silence(&rec).await?;
        let view = silence_view(&rec);
        self.record(
            cx,
            Change {
                action: "alert.silence.add",
                target: rec.id.clone(),
                detail: serde_json::json!({ "matchers": view.matchers, "ends_at": view.ends_at, "comment": view.comment }),
                event: None,
            },
        );
        Ok(view)
    }

    pub async fn expire_silence(&self, cx: &OpCtx, id: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageAlerts)?;
        if !self.store.expire_silence(id, now()).await? {
            return Err(OpError::NotFound(format!("no silence `{id}` in force")));
        }
        self.record(
            cx,
            Change {
                action: "alert.silence.expire",
                target: id.to_owned(),
                detail: serde_json::json!({}),
                event: None,
            },
        );
        Ok(())
    }

    /// The newest notifications and how their delivery went.
    pub async fn notifications(
        &self,
        cx: &OpCtx,
        limit: i64,
    ) -> Result<Vec<NotificationView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        Ok(self
            .store
            .outbox(limit.clamp(1, 1000))
            .await?
            .into_iter()
            .map(|o| NotificationView {
                payload: serde_json::from_str(&o.payload).unwrap_or(serde_json::Value::Null),
                id: o.id,
                sink: o.sink,
                state: o.state,
                attempts: o.attempts,
                last_error: o.last_error,
                created_at: rfc3339(o.created_at),
                sent_at: o.sent_at.map(rfc3339),
            })
            .collect())
    }
}
