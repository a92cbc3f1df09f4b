//! Alerts in Discord: the bot is a notification channel (sinks of kind `discord-bot`, one per
//! server with an alert channel). Each alert is one message with Acknowledge and Silence 1 h
//! buttons; its custom ids carry the alert's fingerprint (stable across restarts) and the
//! message it was posted as is stored, so its resolution edits it. A bot in its own process
//! gets the notifications from the controller and posts them with the same [`post`].

use std::sync::Arc;

use futures::future::BoxFuture;
use nebula_controller::alerts::sinks::Channel;
use nebula_controller::store::alerts::SinkRecord;
use nebula_controller::ControlPlane;
use nebula_types::api::alerts::CreateSilence;

use super::backend::Backend;
use serde_json::Value;
use serenity::all::{
    ButtonStyle, ChannelId, ComponentInteraction, CreateActionRow, CreateButton,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateMessage, EditMessage, Http,
    MessageId,
};

use super::{clip, principal, refusal, who_of_component, Bot};

/// Registered when the controller starts, so servers' alert sinks exist (and queue) before the
/// bot connects. While the bot runs in this process it posts them; otherwise they go to a bot
/// process attached to the controller, if any. Deliveries that fail are retried by the outbox.
pub(crate) struct AlertChannel {
    cp: Arc<ControlPlane>,
    http: std::sync::RwLock<Option<Arc<Http>>>,
}

impl AlertChannel {
    pub(crate) fn new(cp: Arc<ControlPlane>) -> Self {
        Self {
            cp,
            http: std::sync::RwLock::default(),
        }
    }

    /// The connected bot's client (`None`: not connected).
    pub(crate) fn connect(&self, http: Option<Arc<Http>>) {
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
    }
}

/// The channel of a sink's address (`discord:GUILD/CHANNEL`).
fn channel_of(url: &str) -> Result<ChannelId, String> {
    url.strip_prefix("discord:")
        .and_then(|r| r.split_once('/'))
        .and_then(|(_, c)| c.parse::<u64>().ok())
        .filter(|c| *c != 0)
        .map(ChannelId::new)
        .ok_or_else(|| format!("`{url}` is not a Discord bot sink address"))
}

/// An alert's message text.
fn text(a: &Value) -> String {
    let state = a["state"].as_str().unwrap_or("");
    let mark = match (state, a["severity"].as_str().unwrap_or("")) {
        ("resolved", _) => "✅",
        (_, "critical") => "🚨",
        (_, "warning") => "⚠️",
        _ => "ℹ️",
    };
    let labels: Vec<String> = a["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let mut s = format!(
        "{mark} **{}** {} · {}\n{}\n-# {}",
        a["rule"].as_str().unwrap_or(""),
        a["severity"].as_str().unwrap_or(""),
        state,
        a["summary"].as_str().unwrap_or(""),
        labels.join(" ")
    );
    if state == "resolved" {
        s.push_str(&format!(
            "\nResolved at {}",
            a["resolved_at"].as_str().unwrap_or("now")
        ));
    }
    s
}

fn buttons(fingerprint: &str) -> Vec<CreateActionRow> {
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(format!("nebula:ack:{fingerprint}"))
            .label("Acknowledge")
            .style(ButtonStyle::Primary),
        CreateButton::new(format!("nebula:silence:{fingerprint}"))
            .label("Silence 1 h")
            .style(ButtonStyle::Secondary),
    ])]
}

impl AlertChannel {
    async fn send(&self, sink: &SinkRecord, body: &str) -> Result<(), String> {
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        match http {
            Some(http) => {
                let local = super::local::Local(self.cp.clone());
                post(&http, &local, &sink.name, &sink.url, body).await
            }
            None => {
                self.cp
                    .discord
                    .remote
                    .deliver(&sink.name, &sink.url, body)
                    .await
            }
        }
    }
}

/// Post a notification (`body`, as webhooks receive it) for sink `sink` at `url`: a message
/// per new alert, an edit of its message for a change or its resolution.
pub(crate) async fn post(
    http: &Http,
    backend: &dyn Backend,
    sink: &str,
    url: &str,
    body: &str,
) -> Result<(), String> {
    let channel = channel_of(url)?;
    let doc: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if doc["type"] == "alert.test" {
        let t = format!(
            "🔔 Test message from Nebula Command (sink `{sink}`, by {}).",
            doc["data"]["by"].as_str().unwrap_or("?")
        );
        channel
            .send_message(http, CreateMessage::new().content(t))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let alerts = doc["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for a in &alerts {
        let fp = a["fingerprint"].as_str().unwrap_or("");
        let resolved = a["state"] == "resolved";
        let known = backend
            .alert_message(fp, &channel.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let components = if resolved { Vec::new() } else { buttons(fp) };
        match known.and_then(|m| m.parse::<u64>().ok()) {
            Some(m) => {
                let edit = EditMessage::new()
                    .content(clip(&text(a)))
                    .components(components);
                channel
                    .edit_message(http, MessageId::new(m), edit)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // A resolution of an alert never posted here says nothing.
            None if resolved => {}
            None => {
                let msg = CreateMessage::new()
                    .content(clip(&text(a)))
                    .components(components);
                let posted = channel
                    .send_message(http, msg)
                    .await
                    .map_err(|e| e.to_string())?;
                backend
                    .remember_alert_message(fp, &channel.to_string(), &posted.id.to_string())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

impl Channel for AlertChannel {
    fn deliver<'a>(
        &'a self,
        sink: &'a SinkRecord,
        _id: &'a str,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.send(sink, body))
    }
}

/// An alert's Acknowledge or Silence 1 h button, by whoever clicks it (an operator).
pub(crate) async fn clicked(bot: &Arc<Bot>, c: &ComponentInteraction, kind: &str, fp: &str) {
    let who = who_of_component(c);
    let answer = match principal(bot, &who).await {
        Err(why) => why,
        Ok(p) if kind == "ack" => match bot.backend.acknowledge(&p, fp).await {
            Ok(()) => format!("👍 Acknowledged by {}.", p.actor),
            Err(e) => refusal(&e),
        },
        Ok(p) => match bot.backend.alerts(&p).await {
            Err(e) => refusal(&e),
            Ok(list) => match list.into_iter().find(|a| a.fingerprint == fp) {
                None => "⚠️ That alert is not active any more.".into(),
                Some(a) => {
                    let mut matchers = vec![format!("alertname={}", a.rule)];
                    matchers.extend(a.labels.iter().map(|(k, v)| format!("{k}={v}")));
                    let req = CreateSilence {
                        matchers,
                        duration: "1h".into(),
                        comment: format!("from Discord by {}", who.name),
                    };
                    match bot.backend.silence(&p, req).await {
                        Ok(s) => {
                            format!("🔕 Silenced for 1 h by {} (until {}).", p.actor, s.ends_at)
                        }
                        Err(e) => refusal(&e),
                    }
                }
            },
        },
    };
    let msg = CreateInteractionResponseMessage::new()
        .content(clip(&answer))
        .ephemeral(true);
    if let Err(e) = c
        .create_response(&bot.http, CreateInteractionResponse::Message(msg))
        .await
    {
        tracing::warn!("could not answer an alert button: {e}");
        return;
    }
    // Everyone in the channel sees who acknowledged or silenced it.
    if answer.starts_with("👍") || answer.starts_with("🔕") {
        let mut content = c.message.content.clone();
        content.push('\n');
        content.push_str(&answer);
        let edit = EditMessage::new().content(clip(&content));
        if let Err(e) = c
            .channel_id
            .edit_message(&bot.http, c.message.id, edit)
            .await
        {
            tracing::warn!("could not note the action on the alert: {e}");
        }
    }
}
