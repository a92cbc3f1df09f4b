//! The AI commands: `/ask` (a chat answer through the AI gateway, local nodes first, with the
//! server's persona; the gateway's output filters apply as for any caller) and `/imagine` (an
//! image from a node with Stable Diffusion), under each server's rate limits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nebula_controller::authz::Op;
use nebula_types::api::discord::GuildSettings;
use serenity::all::{CommandInteraction, CreateAttachment, EditInteractionResponse};

use super::backend::Principal;

use super::commands::opt;
use super::{clip, edit, principal, refusal, reply, who_of_command, Bot};

/// Per-server rate limits on AI commands: a cooldown per member and a budget per hour.
#[derive(Default)]
pub(crate) struct AiLimiter {
    inner: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    last: HashMap<(String, String), Instant>,
    hour: HashMap<String, VecDeque<Instant>>,
}

impl AiLimiter {
    /// Take one use, or say how long to wait.
    pub(crate) fn take(&self, guild: &str, user: &str, s: &GuildSettings) -> Result<(), Duration> {
        let now = Instant::now();
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cooldown = Duration::from_secs(u64::from(s.ai_limits.cooldown_s));
        let key = (guild.to_owned(), user.to_owned());
        if let Some(t) = st.last.get(&key) {
            if now.duration_since(*t) < cooldown {
                return Err(cooldown - now.duration_since(*t));
            }
        }
        let window = st.hour.entry(guild.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
        {
            window.pop_front();
        }
        if window.len() >= s.ai_limits.per_hour as usize {
            let oldest = window.front().copied().unwrap_or(now);
            return Err(Duration::from_secs(3600).saturating_sub(now.duration_since(oldest)));
        }
        window.push_back(now);
        st.last.insert(key, now);
        st.last
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(3600));
        Ok(())
    }
}

const DEFAULT_PERSONA: &str =
    "You are Nebula, the assistant of a homelab fleet's Discord server. Answer briefly.";

/// Who may run an AI command here, under this server's settings and limits; `None` when the
/// answer (a refusal or "slow down") was sent already.
async fn admit(bot: &Bot, cmd: &CommandInteraction) -> Option<(Principal, Arc<GuildSettings>)> {
    let who = who_of_command(cmd);
    let p = match principal(bot, &who).await {
        Ok(p) => p,
        Err(why) => {
            reply(bot, cmd, &why, true).await;
            return None;
        }
    };
    if let Err(e) = p.allows(Op::Chat) {
        reply(bot, cmd, &refusal(&e), true).await;
        return None;
    }
    let guild = cmd.guild_id.map(|g| g.to_string()).unwrap_or_default();
    let s = match bot.backend.guild_settings(&guild).await {
        Ok(s) => s,
        Err(e) => {
            reply(bot, cmd, &refusal(&e), true).await;
            return None;
        }
    };
    if let Err(wait) = bot.limits.take(&guild, &who.id, &s) {
        let text = format!("⏳ Slow down: try again in {} s.", wait.as_secs().max(1));
        reply(bot, cmd, &text, true).await;
        return None;
    }
    if let Err(e) = cmd.defer(&bot.http).await {
        tracing::warn!(command = %cmd.data.name, "could not defer: {e}");
        return None;
    }
    Some((p, s))
}

fn gateway_error(status: u16, v: &serde_json::Value) -> String {
    let why = v["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("status {status}"));
    format!("⚠️ The gateway could not answer: {why}")
}

/// `/ask PROMPT [model]`.
pub(crate) async fn ask(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let Some((p, s)) = admit(bot, cmd).await else {
        return;
    };
    let mut model = opt(cmd, "model")
        .map(str::to_owned)
        .or_else(|| (!s.persona.model.is_empty()).then(|| s.persona.model.clone()));
    if model.is_none() {
        model = bot.backend.model_names(&p).await.into_iter().next();
    }
    let Some(model) = model else {
        return edit(bot, cmd, "⚠️ No model is served in the fleet now.").await;
    };
    let system = if s.persona.system.is_empty() {
        DEFAULT_PERSONA
    } else {
        &s.persona.system
    };
    let body = serde_json::json!({
        "model": model,
        "stream": false,
        "messages": [
            { "role": "system", "content": system },
            { "role": "user", "content": opt(cmd, "prompt").unwrap_or("") },
        ],
    });
    let answer = bot.backend.chat(&p, body).await;
    let (status, v) = (answer.status, answer.body);
    let text = if (200..300).contains(&status) {
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("(no answer)");
        format!(
            "{answer}\n-# {model} · {} prompt tokens",
            v["usage"]["prompt_tokens"].as_u64().unwrap_or(0)
        )
    } else {
        gateway_error(status, &v)
    };
    edit(bot, cmd, &clip(&text)).await;
}

/// `/imagine PROMPT`: one image from a node with Stable Diffusion (the server's checkpoint, if
/// it names one), posted as an attachment.
pub(crate) async fn imagine(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let Some((p, s)) = admit(bot, cmd).await else {
        return;
    };
    let prompt = opt(cmd, "prompt").unwrap_or("");
    let mut body = serde_json::json!({ "prompt": prompt, "n": 1, "size": "512x512" });
    if !s.persona.image_model.is_empty() {
        body["model"] = s.persona.image_model.clone().into();
    }
    let answer = bot.backend.image(&p, body).await;
    let node = answer.node.unwrap_or_else(|| "?".into());
    let (status, v) = (answer.status, answer.body);
    let png = v["data"][0]["b64_json"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    let edit_with = match ((200..300).contains(&status), png) {
        (true, Some(png)) => EditInteractionResponse::new()
            .content(clip(&format!("🎨 {prompt}\n-# made on {node}")))
            .new_attachment(CreateAttachment::bytes(png, "image.png")),
        (true, None) => EditInteractionResponse::new().content("⚠️ The node sent no image."),
        (false, _) => EditInteractionResponse::new().content(gateway_error(status, &v)),
    };
    if let Err(e) = cmd.edit_response(&bot.http, edit_with).await {
        tracing::warn!("could not post the image: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ai_commands_wait_for_their_cooldown_and_the_hourly_budget() {
        let mut s = GuildSettings::default();
        s.ai_limits.cooldown_s = 60;
        s.ai_limits.per_hour = 2;
        let l = AiLimiter::default();
        assert!(l.take("g", "alice", &s).is_ok());
        assert!(l.take("g", "alice", &s).unwrap_err() > Duration::from_secs(50));
        assert!(l.take("g", "bob", &s).is_ok());
        assert!(
            l.take("g", "carol", &s).is_err(),
            "the server's hour is spent"
        );
        assert!(l.take("other", "carol", &s).is_ok(), "per server");
    }
}
