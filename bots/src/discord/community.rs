//! Community features, per server: welcome and goodbye messages, self-assigned roles, and
//! moderation with the AI gateway's output-filter rules.

use std::sync::{Arc, OnceLock};

use nebula_ai_filters::{Action as FilterAction, Filters};
use nebula_types::api::discord::{GuildSettings, ModAction, Moderated};
use serenity::all::{
    ButtonStyle, CommandInteraction, ComponentInteraction, CreateActionRow, CreateButton,
    CreateInteractionResponse, CreateInteractionResponseMessage, GuildId, Message, RoleId, User,
};

use super::{post, reply, Bot};

/// Welcome (`joined`) or goodbye message for `user` in `guild`.
pub(crate) async fn greet(bot: &Bot, guild: GuildId, user: &User, joined: bool) {
    let Ok(s) = bot.backend.guild_settings(&guild.to_string()).await else {
        return;
    };
    let g = if joined { &s.welcome } else { &s.goodbye };
    if !s.groups.community || g.channel.is_empty() || g.template.is_empty() {
        return;
    }
    let server = bot
        .names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&guild)
        .cloned()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "the server".into());
    let text = render(&g.template, user, &server);
    post(bot, &g.channel, &text).await;
}

/// A greeting's text: `{user}` (a mention), `{name}`, `{server}`.
fn render(template: &str, user: &User, server: &str) -> String {
    template
        .replace("{user}", &format!("<@{}>", user.id))
        .replace("{name}", &user.name)
        .replace("{server}", server)
}

/// Every output-filter rule, on (each server's settings choose what a hit does).
fn filters() -> &'static Filters {
    static FILTERS: OnceLock<Filters> = OnceLock::new();
    FILTERS.get_or_init(|| {
        Filters::new(nebula_ai_filters::all_rules(FilterAction::Log))
            .expect("the built-in rules compile")
    })
}

/// What moderation does with a message: the strongest action of the rules it hits, and the
/// hits (`rule: masked sample`).
fn verdict(s: &GuildSettings, text: &str) -> Option<(ModAction, Vec<String>)> {
    if !s.groups.community || s.moderation.rules.is_empty() {
        return None;
    }
    let (_, hits) = filters().apply(text);
    let mut worst: Option<ModAction> = None;
    let mut seen = Vec::new();
    for h in hits {
        let Some(a) = s.moderation.rules.get(h.rule).copied() else {
            continue;
        };
        seen.push(format!("{}: {}", h.rule, h.sample));
        let rank = |a: ModAction| match a {
            ModAction::Log => 0,
            ModAction::Warn => 1,
            ModAction::Delete => 2,
        };
        if worst.is_none_or(|w| rank(a) > rank(w)) {
            worst = Some(a);
        }
    }
    worst.map(|w| (w, seen))
}

/// Check a member's message against the server's moderation rules.
pub(crate) async fn moderate(bot: &Bot, msg: &Message) {
    let Some(guild) = msg.guild_id else { return };
    let Ok(s) = bot.backend.guild_settings(&guild.to_string()).await else {
        return;
    };
    let Some((action, hits)) = verdict(&s, &msg.content) else {
        return;
    };
    let what = hits.join(", ");
    let done = match action {
        ModAction::Delete => match msg.delete(&bot.http).await {
            Ok(()) => "deleted",
            Err(e) => {
                tracing::warn!(%guild, "could not delete a message: {e}");
                "could not delete"
            }
        },
        ModAction::Warn => {
            let text = format!(
                "<@{}>, please do not post that here ({}).",
                msg.author.id,
                hits.iter()
                    .map(|h| h.split(':').next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Err(e) = msg.reply(&bot.http, text).await {
                tracing::warn!(%guild, "could not warn: {e}");
            }
            "warned"
        }
        ModAction::Log => "logged",
    };
    let who = super::who(&msg.author, None, Some(guild));
    let record = Moderated {
        message: msg.id.to_string(),
        channel: msg.channel_id.to_string(),
        action: done.to_owned(),
        hits: hits.clone(),
    };
    if let Err(e) = bot.backend.moderated(&who, record).await {
        tracing::warn!(%guild, "could not record a moderated message: {e}");
    }
    if !s.moderation.log_channel.is_empty() {
        let text = format!(
            "🛡️ Message by <@{}> in <#{}> {done}: {what}",
            msg.author.id, msg.channel_id
        );
        post(bot, &s.moderation.log_channel, &text).await;
    }
}

/// `/roles`: buttons for the roles members may give themselves.
pub(crate) async fn roles(bot: &Arc<Bot>, cmd: &CommandInteraction) {
    let Some(guild) = cmd.guild_id else { return };
    let Ok(s) = bot.backend.guild_settings(&guild.to_string()).await else {
        return;
    };
    if s.self_roles.is_empty() {
        return reply(bot, cmd, "This server offers no self-assigned roles.", true).await;
    }
    let rows: Vec<CreateActionRow> = s
        .self_roles
        .chunks(5)
        .map(|chunk| {
            CreateActionRow::Buttons(
                chunk
                    .iter()
                    .map(|r| {
                        CreateButton::new(format!("nebula:role:{}", r.role))
                            .label(r.label.clone())
                            .style(ButtonStyle::Secondary)
                    })
                    .collect(),
            )
        })
        .collect();
    let msg = CreateInteractionResponseMessage::new()
        .content("Pick a role (click again to drop it):")
        .components(rows)
        .ephemeral(true);
    if let Err(e) = cmd
        .create_response(&bot.http, CreateInteractionResponse::Message(msg))
        .await
    {
        tracing::warn!("could not offer roles: {e}");
    }
}

/// A self-assigned role's button: add the role, or remove it when the member has it. Only
/// roles the server's settings offer.
pub(crate) async fn role_clicked(bot: &Arc<Bot>, c: &ComponentInteraction, role: &str) {
    let (Some(guild), Some(member)) = (c.guild_id, c.member.as_ref()) else {
        return;
    };
    let Ok(s) = bot.backend.guild_settings(&guild.to_string()).await else {
        return;
    };
    let text = match role.parse::<u64>() {
        Ok(id) if s.self_roles.iter().any(|r| r.role == role) => {
            let role_id = RoleId::new(id);
            let has = member.roles.contains(&role_id);
            let r = if has {
                bot.http
                    .remove_member_role(guild, c.user.id, role_id, Some("self-assigned"))
                    .await
            } else {
                bot.http
                    .add_member_role(guild, c.user.id, role_id, Some("self-assigned"))
                    .await
            };
            match r {
                Ok(()) if has => format!("Removed <@&{role}>."),
                Ok(()) => format!("You have <@&{role}> now."),
                Err(e) => format!("⚠️ Discord refused: {e}"),
            }
        }
        _ => "⛔ That role is not offered here.".into(),
    };
    let msg = CreateInteractionResponseMessage::new()
        .content(text)
        .ephemeral(true);
    let _ = c
        .create_response(&bot.http, CreateInteractionResponse::Message(msg))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_strongest_action_of_the_rules_hit_wins() {
        let mut s = GuildSettings::default();
        assert!(verdict(&s, "key sk-abcdefghijklmnopqrstuvwxyz012345").is_none());
        s.moderation.rules = BTreeMap::from([
            ("api_key".to_owned(), ModAction::Delete),
            ("email".to_owned(), ModAction::Warn),
        ]);
        let (a, hits) = verdict(&s, "mail me: someone@example.com").unwrap();
        assert_eq!(a, ModAction::Warn);
        assert!(hits[0].starts_with("email: "));
        let (a, _) = verdict(&s, "me@example.com and sk-abcdefghijklmnopqrstuvwxyz012345").unwrap();
        assert_eq!(a, ModAction::Delete);
        assert!(verdict(&s, "a friendly hello").is_none());
        s.groups.community = false;
        assert!(verdict(&s, "mail me: someone@example.com").is_none());
    }
}
