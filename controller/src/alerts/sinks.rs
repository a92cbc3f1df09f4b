//! Where notifications go, and how they get there: every notification is in the outbox before
//! it is sent; the sender delivers what is due, retries with capped backoff, and keeps each
//! attempt's outcome.
//!
//! The outbox holds one JSON document per message (this module's `payload_for`); each kind
//! renders it when it is sent:
//!
//! * `webhook`: the document, signed per the Standard Webhooks specification: `webhook-id`
//!   (the message id, the same on every retry), `webhook-timestamp` (Unix seconds) and
//!   `webhook-signature` (`v1,` and the base64 HMAC-SHA256, keyed with the base64 part of the
//!   sink's `whsec_` secret, of `id.timestamp.body`).
//! * `ntfy`: ntfy's publish API (the sink's URL is the topic's): the summary as the body,
//!   `Title`, `Priority` (5 critical, 4 warning, 3 info), `Tags`, and, when the controller
//!   knows its public URL, an `Actions` button that acknowledges the alert through a link
//!   signed with the sink's secret.
//! * `discord`: a Discord webhook's JSON (`embeds` with title, description, colour, fields).
//! * `email`: a plain-text message over SMTP; the sink's URL reads
//!   `smtp://[USER@]HOST[:PORT]?from=ADDR&to=ADDR[&to=ADDR]&tls=starttls|tls|none` (STARTTLS on
//!   587 by default, `tls` on 465; `none` only for a relay on the same host) and its secret is
//!   the SMTP password.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use nebula_alerts::{AlertState, Notification, Severity};
use nebula_types::api::alerts::SinkFilters;
use serde_json::json;

use crate::store::alerts::{OutboxRecord, SinkRecord};
use crate::ControlPlane;

/// Tries before a notification is given up (about a day with the backoff below).
const MAX_ATTEMPTS: i64 = 20;
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(3600);

pub fn parse_severity(s: &str) -> Option<Severity> {
    match s {
        "info" => Some(Severity::Info),
        "warning" => Some(Severity::Warning),
        "critical" => Some(Severity::Critical),
        _ => None,
    }
}

fn severity_str(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

fn state_str(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

/// The body `sink` gets for `note`, or `None` when the sink does not take it (below its
/// severity, or no alert of the group passes its filters).
pub fn payload_for(sink: &SinkRecord, note: &Notification) -> Option<String> {
    let min = parse_severity(&sink.min_severity).unwrap_or(Severity::Info);
    let filters: SinkFilters = serde_json::from_str(&sink.filters).unwrap_or_default();
    // The sink gets the alerts of the group at its severity or above that pass its filters,
    // if any.
    let taken: Vec<&nebula_alerts::Alert> = note
        .alerts
        .iter()
        .filter(|a| a.severity >= min && filters.take(&a.rule, &a.labels))
        .collect();
    let worst = taken.iter().map(|a| a.severity).max()?;
    let alerts: Vec<serde_json::Value> = taken
        .iter()
        .map(|a| {
            json!({
                "rule": a.rule,
                "fingerprint": a.fingerprint(),
                "severity": severity_str(a.severity),
                "state": state_str(a.state),
                "labels": a.labels,
                "summary": a.summary,
                "value": a.value,
                "active_since": rfc3339(a.active_since),
                "fired_at": a.fired_at.map(rfc3339),
                "resolved_at": a.resolved_at.map(rfc3339),
            })
        })
        .collect();
    // What this sink is told: firing while any alert it takes fires.
    let status = if taken.iter().any(|a| a.state == AlertState::Firing) {
        AlertState::Firing
    } else {
        AlertState::Resolved
    };
    let body = json!({
        "type": format!("alert.{}", state_str(status)),
        "timestamp": rfc3339(note.at),
        "data": {
            "group": note.group,
            "status": state_str(status),
            "repeat": note.repeat,
            "severity": severity_str(worst),
            "alerts": alerts,
        }
    });
    Some(body.to_string())
}

/// The `webhook-signature` value for a message.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, String> {
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| "the sink's secret is not whsec_ and base64".to_owned())?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    ))
}

/// A new signing secret: `whsec_` and 24 random bytes in base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source");
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The kinds of sink.
pub const KINDS: [&str; 4] = ["webhook", "ntfy", "discord", "email"];

/// Where an `email` sink sends, read from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    /// `starttls`, `tls` or `none`.
    pub tls: String,
}

impl Smtp {
    pub fn parse(url: &str) -> Result<Smtp, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("`url`: {e}"))?;
        if u.scheme() != "smtp" {
            return Err(
                "an e-mail sink's url reads smtp://[USER@]HOST[:PORT]?from=..&to=..".into(),
            );
        }
        let host = u.host_str().ok_or("the SMTP url names no host")?.to_owned();
        let mut from = None;
        let mut to = Vec::new();
        let mut tls = "starttls".to_owned();
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "from" => from = Some(v.into_owned()),
                "to" => to.push(v.into_owned()),
                "tls" if ["starttls", "tls", "none"].contains(&v.as_ref()) => tls = v.into_owned(),
                other => return Err(format!("the SMTP url's `{other}={v}` is not understood")),
            }
        }
        let from = from.ok_or("the SMTP url needs from=ADDRESS")?;
        if to.is_empty() {
            return Err("the SMTP url needs at least one to=ADDRESS".into());
        }
        for a in std::iter::once(&from).chain(&to) {
            a.parse::<lettre::Address>()
                .map_err(|e| format!("`{a}` is not an e-mail address: {e}"))?;
        }
        let port = u.port().unwrap_or(if tls == "tls" { 465 } else { 587 });
        let user = (!u.username().is_empty()).then(|| u.username().to_owned());
        Ok(Smtp {
            host,
            port,
            user,
            from,
            to,
            tls,
        })
    }
}

async fn send_email(sink: &SinkRecord, subject: &str, text: String) -> Result<(), String> {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let smtp = Smtp::parse(&sink.url)?;
    let mut msg = Message::builder()
        .from(smtp.from.parse().map_err(|e| format!("from: {e}"))?)
        .subject(subject);
    for to in &smtp.to {
        msg = msg.to(to.parse().map_err(|e| format!("to: {e}"))?);
    }
    let msg = msg
        .body(text)
        .map_err(|e| format!("building the message: {e}"))?;
    let builder = match smtp.tls.as_str() {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        "tls" => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(|e| e.to_string())?
        }
        _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
            .map_err(|e| e.to_string())?,
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(Duration::from_secs(20)));
    if let Some(user) = &smtp.user {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            sink.secret.clone(),
        ));
    }
    builder
        .build()
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|e| format!("SMTP: {e}"))
}

/// The signed acknowledge link of an alert, for a sink (valid a week).
pub fn ack_link(public_url: &str, sink: &SinkRecord, fingerprint: &str, now_s: i64) -> String {
    let exp = now_s + 7 * 86_400;
    let sig = ack_signature(&sink.secret, &sink.name, fingerprint, exp);
    let mut url = reqwest::Url::parse(&format!("{}/alerts/ack", public_url.trim_end_matches('/')))
        .expect("the public URL is checked at start");
    url.query_pairs_mut()
        .append_pair("sink", &sink.name)
        .append_pair("alert", fingerprint)
        .append_pair("exp", &exp.to_string())
        .append_pair("sig", &sig);
    url.to_string()
}

/// The signature an acknowledge link carries.
pub fn ack_signature(secret: &str, sink: &str, fingerprint: &str, exp: i64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("ack.{sink}.{fingerprint}.{exp}").as_bytes());
    hex::encode(tag.as_ref())
}

/// Discord's embed colours: red, orange, blue; green when resolved.
fn discord_colour(doc: &serde_json::Value) -> u32 {
    match (
        doc["data"]["status"].as_str(),
        doc["data"]["severity"].as_str(),
    ) {
        (Some("resolved"), _) => 0x3f_b9_50,
        (_, Some("critical")) => 0xf8_51_49,
        (_, Some("warning")) => 0xd2_99_22,
        _ => 0x58_a6_ff,
    }
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn title(doc: &serde_json::Value) -> String {
    if let Some(t) = doc["data"]["title"].as_str() {
        // One line: it may go out as an HTTP header (ntfy's `Title`).
        let mut t: String = t
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        truncate_at_char(&mut t, 250);
        return t;
    }
    let status = doc["data"]["status"].as_str().unwrap_or("");
    let group = doc["data"]["group"].as_str().unwrap_or("");
    let word = if status == "resolved" {
        "Resolved"
    } else {
        "Firing"
    };
    let mut t = format!("{word}: {group}");
    truncate_at_char(&mut t, 250);
    t
}

fn lines(doc: &serde_json::Value) -> String {
    if let Some(t) = doc["data"]["text"].as_str() {
        return t.to_owned();
    }
    doc["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    format!(
                        "{} ({})",
                        x["summary"].as_str().unwrap_or(""),
                        x["state"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A kind of sink that lives elsewhere in the controller (the Discord bot posts alerts with
/// buttons through one): registered under its kind with [`super::AlertBook::register_channel`],
/// it is handed every message for sinks of that kind, after the outbox stored it, and its
/// outcome is recorded and retried like any other.
pub trait Channel: Send + Sync + 'static {
    /// Deliver one message: `body` is the JSON a webhook gets (`type`, `timestamp`, `data`).
    fn deliver<'a>(
        &'a self,
        sink: &'a SinkRecord,
        id: &'a str,
        body: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// Deliver through a registered channel when the sink's kind has one, else by its kind.
pub async fn deliver_to(
    channel: Option<Arc<dyn Channel>>,
    client: &reqwest::Client,
    sink: &SinkRecord,
    id: &str,
    body: &str,
    public_url: Option<&str>,
) -> Result<(), String> {
    match channel {
        Some(c) => c.deliver(sink, id, body).await,
        None => deliver(client, sink, id, body, public_url).await,
    }
}

/// Deliver one message to one sink, rendered for its kind.
pub async fn deliver(
    client: &reqwest::Client,
    sink: &SinkRecord,
    id: &str,
    body: &str,
    public_url: Option<&str>,
) -> Result<(), String> {
    if sink.kind == "email" {
        let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let mut text = lines(&doc);
        if text.is_empty() {
            text = doc.to_string();
        }
        let subject = if doc["type"] == "alert.test" {
            "Nebula Command: test message".to_owned()
        } else {
            title(&doc)
        };
        return send_email(sink, &subject, format!("{text}\n\nmessage {id}\n")).await;
    }
    let req = client.post(&sink.url).timeout(Duration::from_secs(10));
    let req = match sink.kind.as_str() {
        "ntfy" => {
            let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let resolved = doc["data"]["status"] == "resolved";
            let priority = match (resolved, doc["data"]["severity"].as_str()) {
                (true, _) => "3",
                (_, Some("critical")) => "5",
                (_, Some("warning")) => "4",
                _ => "3",
            };
            let tags = if resolved {
                "white_check_mark"
            } else {
                "rotating_light"
            };
            let mut req = req
                .header("Title", title(&doc))
                .header("Priority", priority)
                .header("Tags", tags);
            let first = doc["data"]["alerts"][0]["fingerprint"].as_str();
            if let (false, Some(base), Some(fp)) = (resolved, public_url, first) {
                let now_s = nebula_protocol::time::UnixMillis::now().as_i64() / 1000;
                let link = ack_link(base, sink, fp, now_s);
                req = req.header(
                    "Actions",
                    format!("http, Acknowledge, {link}, method=POST, clear=true"),
                );
            }
            let text = lines(&doc);
            req.body(if text.is_empty() {
                doc["type"].as_str().unwrap_or("").to_owned()
            } else {
                text
            })
        }
        "discord" => {
            let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let mut description = lines(&doc);
            truncate_at_char(&mut description, 4000);
            let embed = json!({
                "embeds": [{
                    "title": title(&doc),
                    "description": description,
                    "color": discord_colour(&doc),
                    "timestamp": doc["timestamp"],
                    "fields": [
                        {"name": "Severity", "value": doc["data"]["severity"].as_str().unwrap_or("-"), "inline": true},
                        {"name": "Alerts", "value": doc["data"]["alerts"].as_array().map_or(0, Vec::len).to_string(), "inline": true},
                    ],
                }],
            });
            req.header("content-type", "application/json")
                .body(embed.to_string())
        }
        _ => {
            let ts = nebula_protocol::time::UnixMillis::now().as_i64() / 1000;
            let signature = sign(&sink.secret, id, ts, body)?;
            req.header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .body(body.to_owned())
        }
    };
    let resp = req.send().await.map_err(|e| format!("sending: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", resp.status()))
    }
}

fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(exp))
        .min(MAX_RETRY)
}

/// Deliver what is due in the outbox; each attempt's outcome is recorded.
pub async fn send_due(cp: &Arc<ControlPlane>) -> anyhow::Result<serde_json::Value> {
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    let due = cp.store.due_outbox(now, 100).await?;
    if due.is_empty() {
        return Ok(json!({ "sent": 0 }));
    }
    let sinks = cp.store.sinks().await?;
    let (mut sent, mut failed) = (0, 0);
    for o in due {
        let outcome = match sinks.iter().find(|s| s.name == o.sink) {
            Some(sink) => {
                let public = cp.config.public_url.as_deref();
                let channel = cp.alerts.channel(&sink.kind);
                deliver_to(channel, &cp.http_client, sink, &o.id, &o.payload, public).await
            }
            None => Err(format!("the sink `{}` was removed", o.sink)),
        };
        record(cp, &o, outcome, &mut sent, &mut failed).await?;
    }
    Ok(json!({ "sent": sent, "failed": failed }))
}

async fn record(
    cp: &ControlPlane,
    o: &OutboxRecord,
    outcome: Result<(), String>,
    sent: &mut usize,
    failed: &mut usize,
) -> anyhow::Result<()> {
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    match outcome {
        Ok(()) => {
            *sent += 1;
            cp.store
                .outbox_attempt(&o.id, "sent", now, None, now)
                .await?;
        }
        Err(e) => {
            *failed += 1;
            let gave_up = o.attempts + 1 >= MAX_ATTEMPTS;
            let state = if gave_up { "failed" } else { "pending" };
            let next = now + i64::try_from(backoff(o.attempts).as_millis()).unwrap_or(i64::MAX);
            tracing::warn!(sink = %o.sink, id = %o.id, attempts = o.attempts + 1, "notification not delivered: {e}");
            cp.store
                .outbox_attempt(&o.id, state, next, Some(&e), now)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nebula_alerts::{Alert, Labels};

    fn sink(kind: &str, min: &str, filters: &str) -> SinkRecord {
        SinkRecord {
            name: "s".into(),
            kind: kind.into(),
            url: "http://127.0.0.1:9/".into(),
            secret: "whsec_c2VjcmV0".into(),
            min_severity: min.into(),
            filters: filters.into(),
            created_by: "t".into(),
            created_at: 0,
        }
    }

    /// (rule, severity, labels) of each alert in a group.
    type Spec<'a> = (&'a str, Severity, &'a [(&'a str, &'a str)]);

    fn note(alerts: &[Spec<'_>]) -> Notification {
        Notification {
            group: "g".into(),
            status: AlertState::Firing,
            alerts: alerts
                .iter()
                .map(|(rule, sev, labels)| Alert {
                    rule: (*rule).into(),
                    severity: *sev,
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<Labels>(),
                    state: AlertState::Firing,
                    summary: String::new(),
                    value: None,
                    active_since: 0,
                    fired_at: Some(0),
                    last_active: 0,
                    resolved_at: None,
                    acknowledged_by: None,
                })
                .collect(),
            repeat: false,
            at: 0,
        }
    }

    #[test]
    fn sinks_take_what_passes_their_severity_and_filters() {
        let n = note(&[
            (
                "container_down",
                Severity::Warning,
                &[("node", "a"), ("service", "web")],
            ),
            ("cpu_high", Severity::Critical, &[("node", "b")]),
        ]);
        let rules = |s: &SinkRecord| -> Vec<String> {
            payload_for(s, &n).map_or(Vec::new(), |p| {
                let v: serde_json::Value = serde_json::from_str(&p).unwrap();
                v["data"]["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["rule"].as_str().unwrap().to_owned())
                    .collect()
            })
        };
        assert_eq!(rules(&sink("webhook", "info", "{}")).len(), 2);
        assert_eq!(rules(&sink("webhook", "critical", "{}")), vec!["cpu_high"]);
        assert_eq!(
            rules(&sink("webhook", "info", r#"{"nodes":["a"]}"#)),
            vec!["container_down"]
        );
        assert_eq!(
            rules(&sink("webhook", "info", r#"{"services":["web"]}"#)),
            vec!["container_down"]
        );
        assert_eq!(
            rules(&sink("webhook", "info", r#"{"rules":["cpu_high"]}"#)),
            vec!["cpu_high"]
        );
        assert!(
            rules(&sink("webhook", "critical", r#"{"nodes":["a"]}"#)).is_empty(),
            "nothing left"
        );
        assert!(rules(&sink("webhook", "info", r#"{"labels":{"team":"ml"}}"#)).is_empty());
        // A sink told only of a resolved alert hears "resolved", whatever else fires in the group.
        let mut mixed = note(&[
            ("container_down", Severity::Warning, &[("service", "web")]),
            ("container_down", Severity::Warning, &[("service", "db")]),
        ]);
        mixed.alerts[0].state = AlertState::Resolved;
        let p = payload_for(&sink("webhook", "info", r#"{"services":["web"]}"#), &mixed).unwrap();
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["data"]["status"].as_str()),
            (Some("alert.resolved"), Some("resolved"))
        );
    }

    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl Channel for Recorder {
        fn deliver<'a>(
            &'a self,
            sink: &'a SinkRecord,
            id: &'a str,
            body: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{} {id} {body}", sink.name));
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_registered_channel_gets_its_kind_of_sink() {
        let book = super::super::AlertBook::default();
        let rec = Arc::new(Recorder(std::sync::Mutex::new(Vec::new())));
        book.register_channel("discord-bot", rec.clone());
        assert!(book.has_channel("discord-bot") && !book.has_channel("pager"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let s = sink("discord-bot", "info", "{}");
        let out = deliver_to(
            book.channel(&s.kind),
            &client,
            &s,
            "msg_1",
            "{\"type\":\"alert.test\"}",
            None,
        )
        .await;
        assert_eq!(out, Ok(()));
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            ["s msg_1 {\"type\":\"alert.test\"}"]
        );
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The specification's own example (standard-webhooks, "Verifying signatures").
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = r#"{"test": 2432232314}"#;
        let sig = sign(secret, id, 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("whsec_***", id, 0, body).is_err());
        assert!(new_secret().starts_with("whsec_"));
    }

    #[test]
    fn smtp_urls_name_the_server_the_addresses_and_the_tls() {
        let s = Smtp::parse(
            "smtp://alerts@mail.example:2525?from=n@example.org&to=a@example.org&to=b@example.org",
        )
        .unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.user.as_deref()),
            ("mail.example", 2525, Some("alerts"))
        );
        assert_eq!((s.tls.as_str(), s.to.len()), ("starttls", 2));
        assert_eq!(
            Smtp::parse("smtp://m.example?from=n@e.org&to=a@e.org&tls=tls")
                .unwrap()
                .port,
            465
        );
        assert_eq!(
            Smtp::parse("smtp://m.example?from=n@e.org&to=a@e.org")
                .unwrap()
                .port,
            587
        );
        assert!(Smtp::parse("http://m.example?from=n@e.org&to=a@e.org").is_err());
        assert!(
            Smtp::parse("smtp://m.example?from=n@e.org").is_err(),
            "no recipient"
        );
        assert!(
            Smtp::parse("smtp://m.example?from=nobody&to=a@e.org").is_err(),
            "bad address"
        );
        assert!(Smtp::parse("smtp://m.example?from=n@e.org&to=a@e.org&tls=maybe").is_err());
    }

    #[test]
    fn retries_back_off_to_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(5));
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(30), MAX_RETRY);
    }
}
