//! Checks of what a bot or a person sends about Discord: ids, users, server settings.

use nebula_types::api::discord::{DiscordUser, GuildSettings};

/// A Discord id: 1 to 20 digits.
pub(crate) fn valid_snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The Discord user a bot token acts for, from `x-nebula-discord-user` (id), `-name`, `-guild`
/// (id) and `-roles` (comma-separated ids).
pub(crate) fn user_from_headers(h: &axum::http::HeaderMap) -> Result<DiscordUser, &'static str> {
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    let snowflake = valid_snowflake;
    let id = get("x-nebula-discord-user")
        .filter(|s| snowflake(s))
        .ok_or("a bot token acts for a Discord user: x-nebula-discord-user is their id")?;
    let guild = get("x-nebula-discord-guild").filter(|s| !s.is_empty());
    if guild.is_some_and(|g| !snowflake(g)) {
        return Err("x-nebula-discord-guild is a server id");
    }
    let roles: Vec<String> = get("x-nebula-discord-roles")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    if roles.len() > 250 || !roles.iter().all(|r| snowflake(r)) {
        return Err("x-nebula-discord-roles lists role ids");
    }
    Ok(DiscordUser {
        id: id.to_owned(),
        name: percent_decode(get("x-nebula-discord-name").unwrap_or(id))
            .chars()
            .take(64)
            .collect(),
        guild: guild.map(str::to_owned),
        roles,
        // Only Discord's own payloads say who manages a server; a header does not.
        guild_admin: false,
    })
}

/// A header's `%XX` escapes decoded (a bot in its own process sends names that way).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Check a Discord user a bot sends in a body: ids are snowflakes, the name is bounded.
pub fn check_user(who: &DiscordUser) -> Result<(), String> {
    if !valid_snowflake(&who.id) {
        return Err("`user.id` is a Discord user id (digits)".into());
    }
    if who.guild.as_deref().is_some_and(|g| !valid_snowflake(g)) {
        return Err("`user.guild` is a server id".into());
    }
    if who.roles.len() > 250 || !who.roles.iter().all(|r| valid_snowflake(r)) {
        return Err("`user.roles` lists role ids".into());
    }
    if who.name.is_empty() || who.name.chars().count() > 64 {
        return Err("`user.name` has 1 to 64 characters".into());
    }
    Ok(())
}

/// Check a server's settings: ids are Discord snowflakes, texts are bounded, moderation rules
/// name rule kinds the output filters know.
pub fn check_settings(s: &GuildSettings) -> Result<(), String> {
    let channel = |what: &str, v: &str| {
        if v.is_empty() || valid_snowflake(v) {
            Ok(())
        } else {
            Err(format!("`{what}` is a channel id (digits), not `{v}`"))
        }
    };
    channel("alerts.channel", &s.alerts.channel)?;
    channel("welcome.channel", &s.welcome.channel)?;
    channel("goodbye.channel", &s.goodbye.channel)?;
    channel("moderation.log_channel", &s.moderation.log_channel)?;
    for c in &s.channels {
        channel("channels", c)?;
    }
    for r in s.roles.keys().chain(s.self_roles.iter().map(|r| &r.role)) {
        if !valid_snowflake(r) {
            return Err(format!("`{r}` is not a Discord role id"));
        }
    }
    if s.self_roles.len() > 25 || s.channels.len() > 100 || s.roles.len() > 100 {
        return Err("at most 25 self-assigned roles, 100 channels and 100 role mappings".into());
    }
    if s.nickname.chars().count() > 32 {
        return Err("a nickname has at most 32 characters".into());
    }
    for (what, text, max) in [
        ("persona.system", &s.persona.system, 4000),
        ("persona.model", &s.persona.model, 200),
        ("persona.image_model", &s.persona.image_model, 200),
        ("welcome.template", &s.welcome.template, 1800),
        ("goodbye.template", &s.goodbye.template, 1800),
    ] {
        if text.chars().count() > max {
            return Err(format!("`{what}` has at most {max} characters"));
        }
    }
    if !s.alerts.min_severity.is_empty()
        && !matches!(
            s.alerts.min_severity.as_str(),
            "info" | "warning" | "critical"
        )
    {
        return Err("`alerts.min_severity` is info, warning or critical".into());
    }
    for kind in s.moderation.rules.keys() {
        if !nebula_ai_filters::RULE_KINDS.contains(&kind.as_str()) {
            return Err(format!(
                "moderation rule `{kind}`: one of {}",
                nebula_ai_filters::RULE_KINDS.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_headers_are_percent_decoded() {
        assert_eq!(percent_decode("zo%C3%AB%25"), "zoë%");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
