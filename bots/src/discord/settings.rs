//! `/link` and `/settings`.

use std::sync::Arc;

use nebula_types::api::discord::{GuildSettings, ModAction};
use serenity::all::CommandInteraction;

use super::commands::opt;
use super::{refusal, reply, who_of_command, Bot};

/// `/link CODE`: link this Discord account to the user whose code it is.
pub(crate) async fn link(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let who = who_of_command(cmd);
    let code = opt(cmd, "code").unwrap_or("");
    let text = match bot.backend.redeem_link(&who, code).await {
        Ok(p) => format!("🔗 Linked: you are `{}` here now.", p.actor),
        Err(e) => refusal(&e),
    };
    reply(bot, cmd, &text, true).await;
}

/// `/settings [key value]`: show this server's settings, or change one.
pub(crate) async fn settings(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let Some(guild) = cmd.guild_id else {
        return reply(
            bot,
            cmd,
            "Settings belong to a server: use this in one.",
            true,
        )
        .await;
    };
    let guild = guild.to_string();
    let who = who_of_command(cmd);
    // Discord's word on who manages the server; the control plane checks it again on a change.
    if !who.guild_admin {
        let why =
            "⛔ Refused: only the server's admins (Manage Server) see and change its settings.";
        return reply(bot, cmd, why, true).await;
    }
    let current = match bot.backend.guild_settings(&guild).await {
        Ok(s) => (*s).clone(),
        Err(e) => return reply(bot, cmd, &refusal(&e), true).await,
    };
    let Some(key) = opt(cmd, "key") else {
        return reply(bot, cmd, &show(&current), true).await;
    };
    let value = opt(cmd, "value").unwrap_or("").trim();
    let next = match change(current, key, value) {
        Ok(s) => s,
        Err(why) => return reply(bot, cmd, &format!("⚠️ {why}"), true).await,
    };
    let text = match bot.backend.set_settings(&who, &guild, next).await {
        Ok(_) => format!("✅ `{key}` changed."),
        Err(e) => refusal(&e),
    };
    reply(bot, cmd, &text, true).await;
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn show(s: &GuildSettings) -> String {
    let ch = |c: &str| {
        if c.is_empty() {
            "off".to_owned()
        } else {
            format!("<#{c}>")
        }
    };
    let rules: Vec<String> = s
        .moderation
        .rules
        .iter()
        .map(|(k, v)| format!("{k}={}", format!("{v:?}").to_lowercase()))
        .collect();
    format!(
        "**Settings**\ngroups: fleet {} · ai {} · community {}\nnickname: {}\nchannels: {}\n\
         persona: {} (model {})\nalerts: {}\nwelcome: {} · goodbye: {}\n\
         moderation: {} (log {})\nAI limits: {} s cooldown, {} per hour\n\
         role mappings: {} (changed by a Nebula admin)",
        on_off(s.groups.fleet),
        on_off(s.groups.ai),
        on_off(s.groups.community),
        if s.nickname.is_empty() {
            "-"
        } else {
            &s.nickname
        },
        if s.channels.is_empty() {
            "all".to_owned()
        } else {
            s.channels
                .iter()
                .map(|c| ch(c))
                .collect::<Vec<_>>()
                .join(", ")
        },
        if s.persona.system.is_empty() {
            "default"
        } else {
            "custom"
        },
        if s.persona.model.is_empty() {
            "routed"
        } else {
            &s.persona.model
        },
        ch(&s.alerts.channel),
        ch(&s.welcome.channel),
        ch(&s.goodbye.channel),
        if rules.is_empty() {
            "off".to_owned()
        } else {
            rules.join(", ")
        },
        ch(&s.moderation.log_channel),
        s.ai_limits.cooldown_s,
        s.ai_limits.per_hour,
        s.roles.len()
    )
}

/// A channel mention (`<#123>`) or id.
fn channel_id(v: &str) -> Result<String, String> {
    let id = v.trim().trim_start_matches("<#").trim_end_matches('>');
    if id.is_empty() || id == "off" {
        return Ok(String::new());
    }
    if id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id.to_owned())
    } else {
        Err(format!("`{v}` is not a channel"))
    }
}

/// `#channel template...` for welcome and goodbye.
fn greeting(v: &str) -> Result<(String, String), String> {
    let (c, rest) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
    Ok((channel_id(c)?, rest.trim().to_owned()))
}

/// Apply `/settings KEY VALUE` to the settings.
pub(crate) fn change(
    mut s: GuildSettings,
    key: &str,
    value: &str,
) -> Result<GuildSettings, String> {
    match key {
        "group" => {
            let (g, v) = value
                .split_once(char::is_whitespace)
                .ok_or("`group NAME on|off` (fleet, ai or community)")?;
            let on = match v.trim() {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                other => return Err(format!("`{other}`: on or off")),
            };
            match g {
                "fleet" => s.groups.fleet = on,
                "ai" => s.groups.ai = on,
                "community" => s.groups.community = on,
                other => return Err(format!("no command group `{other}` (fleet, ai, community)")),
            }
        }
        "nickname" => s.nickname = value.to_owned(),
        "persona" => s.persona.system = value.to_owned(),
        "model" => s.persona.model = value.to_owned(),
        "alerts" => s.alerts.channel = channel_id(value)?,
        "welcome" => (s.welcome.channel, s.welcome.template) = greeting(value)?,
        "goodbye" => (s.goodbye.channel, s.goodbye.template) = greeting(value)?,
        "log" => s.moderation.log_channel = channel_id(value)?,
        "moderation" => {
            let (rule, action) = value
                .split_once(['=', ' '])
                .ok_or("`RULE=ACTION`: api_key, email, phone, card, profanity or code_injection; warn, delete, log or off")?;
            let action = match action.trim() {
                "warn" => Some(ModAction::Warn),
                "delete" => Some(ModAction::Delete),
                "log" => Some(ModAction::Log),
                "off" => None,
                other => return Err(format!("`{other}`: warn, delete, log or off")),
            };
            match action {
                Some(a) => s.moderation.rules.insert(rule.trim().to_owned(), a),
                None => s.moderation.rules.remove(rule.trim()),
            };
        }
        "channels" => {
            s.channels = value
                .split([' ', ','])
                .filter(|c| !c.is_empty())
                .map(channel_id)
                .filter(|c| !matches!(c, Ok(c) if c.is_empty()))
                .collect::<Result<_, _>>()?;
        }
        "ai_limits" => {
            let mut it = value.split_whitespace().map(str::parse::<u32>);
            match (it.next(), it.next()) {
                (Some(Ok(c)), Some(Ok(h))) => {
                    s.ai_limits.cooldown_s = c;
                    s.ai_limits.per_hour = h;
                }
                _ => return Err("`COOLDOWN_SECONDS PER_HOUR`, e.g. `10 60`".into()),
            }
        }
        other => return Err(format!("no setting `{other}`")),
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_change_one_key_at_a_time_and_refuse_nonsense() {
        let s = change(GuildSettings::default(), "group", "ai off").unwrap();
        assert!(!s.groups.ai && s.groups.fleet);
        let s = change(s, "welcome", "<#42> Hello {user}!").unwrap();
        assert_eq!(
            (s.welcome.channel.as_str(), s.welcome.template.as_str()),
            ("42", "Hello {user}!")
        );
        let s = change(s, "moderation", "api_key=delete").unwrap();
        assert_eq!(s.moderation.rules["api_key"], ModAction::Delete);
        let s = change(s, "channels", "<#1>, <#2>").unwrap();
        assert_eq!(s.channels, ["1", "2"]);
        assert!(change(s.clone(), "group", "gpu on").is_err());
        assert!(change(s.clone(), "alerts", "#general").is_err());
        assert!(change(s.clone(), "ai_limits", "ten").is_err());
        assert!(change(s, "roles", "1=admin").is_err());
    }
}
