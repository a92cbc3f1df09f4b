//! The Discord bot's side of the control plane: each server's settings, who a Discord user is
//! here (a linked account, a mapped Discord role, or what the server allows everyone), and the
//! one-time link codes. The bot itself (`nebula-bots`) only speaks Discord: every command it
//! runs calls the same operations as the API with the [`OpCtx`] made here, so one check
//! ([`ControlPlane::authorize`]) judges it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nebula_types::api::alerts::CreateSink;
use nebula_types::api::discord::{BotStatus, DiscordLink, GuildSettings, GuildView, LinkCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use crate::authz::{Change, Op, OpCtx, Role, Via};
use crate::store::discord::GuildRecord;
use crate::{ControlPlane, OpError};

/// How long a link code stays valid.
pub const LINK_CODE_TTL: Duration = Duration::from_secs(15 * 60);
/// The output-filter rules moderation can act on.
pub use nebula_ai_filters::RULE_KINDS as MODERATION_RULES;
/// The token stored from the dashboard, in the data dir.
pub const TOKEN_FILE: &str = "discord.token";
/// The sink kind the bot registers for alerts with buttons.
pub const SINK_KIND: &str = "discord-bot";

/// `[discord]` in the controller's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordConfig {
    /// A file holding the bot token (`NEBULA_DISCORD_TOKEN_FILE`); none: no bot.
    pub token_file: Option<PathBuf>,
    /// Discord's address (default `https://discord.com`).
    pub api_url: Option<String>,
    /// How long a destructive command waits for its user's confirmation.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            api_url: None,
            confirm_timeout: Duration::from_secs(120),
        }
    }
}

/// The bot's state inside the control plane.
pub struct DiscordBook {
    guilds: Mutex<HashMap<String, Arc<GuildSettings>>>,
    status: Mutex<BotStatus>,
    /// Sent when a server's settings change (the bot registers that server's commands again);
    /// the value is the server's id.
    changed: tokio::sync::broadcast::Sender<String>,
    /// A token was stored from the dashboard or the API: the bot (re)connects with it.
    pub token_changed: tokio::sync::Notify,
}

impl Default for DiscordBook {
    fn default() -> Self {
        Self {
            guilds: Mutex::default(),
            status: Mutex::new(BotStatus {
                configured: false,
                connected: false,
                account: None,
                application_id: None,
            }),
            changed: tokio::sync::broadcast::channel(64).0,
            token_changed: tokio::sync::Notify::new(),
        }
    }
}

impl DiscordBook {
    pub fn status(&self) -> BotStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_status(&self, f: impl FnOnce(&mut BotStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Servers whose settings changed, by id.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changed.subscribe()
    }
}

/// A Discord user as the bot saw them in one interaction or message.
#[derive(Debug, Clone, Default)]
pub struct DiscordUser {
    pub id: String,
    pub name: String,
    /// The server (none in a direct message).
    pub guild: Option<String>,
    /// Their Discord role ids in that server.
    pub roles: Vec<String>,
    /// Discord says they may manage the server (`MANAGE_GUILD` or `ADMINISTRATOR`).
    pub guild_admin: bool,
}

impl DiscordUser {
    fn origin(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "discord".into(),
            json!({ "user": self.id, "name": self.name, "guild": self.guild }),
        );
        m
    }

    /// A context for `role` on this user's behalf, named `actor`.
    fn cx(&self, actor: String, role: Role) -> OpCtx {
        let mut cx = OpCtx::new(actor, role, Via::Discord);
        cx.origin = Some(self.origin());
        cx
    }
}

fn now() -> i64 {
    nebula_protocol::time::UnixMillis::now().as_i64()
}

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

/// Write `text` to a file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn code_hash(code: &str) -> String {
    let normal: String = code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex::encode(sha2::Sha256::digest(normal.as_bytes()))
}

/// A Discord id: 1 to 20 digits.
pub(crate) fn valid_snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
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

impl ControlPlane {
    /// A server's settings (the defaults for a server never seen).
    pub async fn guild_settings(&self, guild: &str) -> Result<Arc<GuildSettings>, OpError> {
        if let Some(s) = self
            .discord
            .guilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(guild)
        {
            return Ok(s.clone());
        }
        let settings = match self.store.discord_guild(guild).await? {
            Some(g) => serde_json::from_str(&g.settings).unwrap_or_else(|e| {
                tracing::warn!(
                    guild,
                    "stored settings do not parse ({e}); using the defaults"
                );
                GuildSettings::default()
            }),
            None => GuildSettings::default(),
        };
        let settings = Arc::new(settings);
        self.discord
            .guilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guild.to_owned(), settings.clone());
        Ok(settings)
    }

    /// The bot's token: `[discord] token_file` when set, else the one stored in the data dir
    /// from the dashboard (`discord.token`); `None` when there is none.
    pub fn discord_token(&self) -> Option<String> {
        let path = self
            .config
            .discord
            .token_file
            .clone()
            .unwrap_or_else(|| self.config.data_dir.join(TOKEN_FILE));
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }

    /// Store the bot's token in the data dir (0600) and (re)connect the bot with it. Refused
    /// when `[discord] token_file` is set (that file is the token then).
    pub async fn set_discord_token(&self, cx: &OpCtx, token: &str) -> Result<(), OpError> {
        self.authorize(cx, Op::ManageBot)?;
        let token = token.trim();
        if token.len() < 20 || token.len() > 200 || token.chars().any(char::is_whitespace) {
            return Err(OpError::Invalid(
                "that does not look like a Discord bot token".into(),
            ));
        }
        if self.config.discord.token_file.is_some() {
            return Err(OpError::Conflict(
                "the token comes from [discord] token_file in the controller's config".into(),
            ));
        }
        let path = self.config.data_dir.join(TOKEN_FILE);
        write_private(&path, token).map_err(|e| {
            tracing::error!(path = %path.display(), "could not store the Discord token: {e}");
            OpError::Conflict("the controller could not store the token (see its log)".into())
        })?;
        self.record(
            cx,
            Change {
                action: "discord.token",
                target: "discord".into(),
                detail: json!({}),
                event: None,
            },
        );
        self.discord.token_changed.notify_waiters();
        Ok(())
    }

    /// Record a server the bot is in.
    pub async fn discord_guild_seen(&self, guild: &str, name: &str) -> Result<(), OpError> {
        let defaults = serde_json::to_string(&GuildSettings::default()).unwrap_or_default();
        self.store
            .seen_discord_guild(guild, name, &defaults, now())
            .await?;
        Ok(())
    }

    pub async fn discord_guilds(&self, cx: &OpCtx) -> Result<Vec<GuildView>, OpError> {
        self.authorize(cx, Op::ReadFleet)?;
        Ok(self
            .store
            .discord_guilds()
            .await?
            .into_iter()
            .map(|g| GuildView {
                settings: serde_json::from_str(&g.settings).unwrap_or_default(),
                id: g.guild_id,
                name: g.name,
                updated_by: g.updated_by,
                updated_at: rfc3339(g.updated_at),
            })
            .collect())
    }

    /// Replace a server's settings. A Nebula admin may change anything; a member Discord calls
    /// the server's admin (`as_guild_admin`, from `/settings`) may change everything but who
    /// holds which Nebula role there.
    pub async fn set_guild_settings(
        &self,
        cx: &OpCtx,
        guild: &str,
        settings: GuildSettings,
        as_guild_admin: bool,
    ) -> Result<GuildView, OpError> {
        if !valid_snowflake(guild) {
            return Err(OpError::Invalid(format!(
                "`{guild}` is not a Discord server id"
            )));
        }
        check_settings(&settings).map_err(OpError::Invalid)?;
        let old = self.guild_settings(guild).await?;
        let grants_changed = old.roles != settings.roles || old.everyone != settings.everyone;
        if !as_guild_admin || grants_changed {
            self.authorize(cx, Op::ManageBot).map_err(|e| {
                if as_guild_admin {
                    OpError::Forbidden(
                        "role mappings and the everyone role are changed by a Nebula admin \
                         (the dashboard's Discord page or `nebula discord set`)"
                            .into(),
                    )
                } else {
                    e
                }
            })?;
        }
        let name = self
            .store
            .discord_guild(guild)
            .await?
            .map(|g| g.name)
            .unwrap_or_default();
        let rec = GuildRecord {
            guild_id: guild.to_owned(),
            name: name.clone(),
            settings: serde_json::to_string(&settings).unwrap_or_default(),
            updated_by: cx.actor.clone(),
            updated_at: now(),
        };
        self.store.put_discord_guild(&rec).await?;
        let alerts_changed = old.alerts != settings.alerts;
        self.discord
            .guilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guild.to_owned(), Arc::new(settings.clone()));
        if alerts_changed {
            self.sync_guild_sink(guild, &settings).await?;
        }
        self.record(
            cx,
            Change {
                action: "discord.settings",
                target: guild.to_owned(),
                detail: json!({ "settings": settings }),
                event: None,
            },
        );
        let _ = self.discord.changed.send(guild.to_owned());
        Ok(GuildView {
            id: guild.to_owned(),
            name,
            settings,
            updated_by: rec.updated_by,
            updated_at: rfc3339(rec.updated_at),
        })
    }

    /// The alert sink that posts to a server's alert channel (`discord-GUILD`), made, replaced
    /// or removed to match its settings.
    async fn sync_guild_sink(&self, guild: &str, s: &GuildSettings) -> Result<(), OpError> {
        let internal = OpCtx::internal("discord");
        let name = format!("discord-{guild}");
        let exists = self.store.sinks().await?.iter().any(|k| k.name == name);
        if exists {
            self.remove_sink(&internal, &name).await?;
        }
        if s.alerts.channel.is_empty() {
            return Ok(());
        }
        self.add_sink(
            &internal,
            CreateSink {
                name,
                kind: SINK_KIND.into(),
                url: format!("discord:{guild}/{}", s.alerts.channel),
                min_severity: (!s.alerts.min_severity.is_empty())
                    .then(|| s.alerts.min_severity.clone()),
                password: None,
                filters: s.alerts.filters.clone(),
            },
        )
        .await?;
        Ok(())
    }

    /// A one-time code that links the Discord account that sends it (`/link CODE`) to `user`.
    /// Users make their own; an admin makes them for anyone.
    pub async fn discord_link_code(&self, cx: &OpCtx, user: &str) -> Result<LinkCode, OpError> {
        if cx.actor != user {
            self.authorize(cx, Op::ManageBot)?;
        }
        if self.store.user_by_name(user).await?.is_none() {
            return Err(OpError::NotFound(format!("no user named `{user}`")));
        }
        use rand::Rng;
        const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        let raw: String = {
            let mut rng = rand::thread_rng();
            (0..10)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect()
        };
        let code = format!("{}-{}", &raw[..5], &raw[5..]);
        let expires = now() + LINK_CODE_TTL.as_millis() as i64;
        self.store
            .put_discord_link_code(&code_hash(&code), user, expires)
            .await?;
        self.record(
            cx,
            Change {
                action: "discord.link_code",
                target: user.to_owned(),
                detail: json!({ "expires_at": rfc3339(expires) }),
                event: None,
            },
        );
        Ok(LinkCode {
            user: user.to_owned(),
            code,
            expires_at: rfc3339(expires),
        })
    }

    /// Link the Discord account `who` to the user whose code this is (once).
    pub async fn redeem_discord_link(
        &self,
        who: &DiscordUser,
        code: &str,
    ) -> Result<String, OpError> {
        let user = self
            .store
            .redeem_discord_link_code(&code_hash(code), &who.id, &who.name, now())
            .await?
            .ok_or_else(|| {
                OpError::NotFound("this link code is unknown, used or expired".into())
            })?;
        let role = self
            .store
            .user_by_name(&user)
            .await?
            .map(|u| Role::parse(&u.role))
            .unwrap_or(Role::Viewer);
        self.record(
            &who.cx(user.clone(), role),
            Change {
                action: "discord.link",
                target: user.clone(),
                detail: json!({}),
                event: None,
            },
        );
        Ok(user)
    }

    pub async fn discord_links(&self, cx: &OpCtx) -> Result<Vec<DiscordLink>, OpError> {
        self.authorize(cx, Op::ReadAudit)?;
        Ok(self
            .store
            .discord_links()
            .await?
            .into_iter()
            .map(|l| DiscordLink {
                discord_user: l.discord_user,
                discord_name: l.discord_name,
                user: l.username,
                linked_at: rfc3339(l.linked_at),
            })
            .collect())
    }

    /// Who `who` is here: their linked user's role; else the best Nebula role their Discord
    /// roles map to in that server; else what the server gives everyone. Refused when none.
    pub async fn discord_principal(&self, who: &DiscordUser) -> Result<OpCtx, OpError> {
        if let Some(link) = self.store.discord_link(&who.id).await? {
            if let Some(u) = self.store.user_by_name(&link.username).await? {
                return Ok(who.cx(u.username, Role::parse(&u.role)));
            }
        }
        let actor = format!("discord:{}", who.name);
        if let Some(guild) = &who.guild {
            let s = self.guild_settings(guild).await?;
            let mapped = who.roles.iter().filter_map(|r| s.roles.get(r)).max();
            if let Some(role) = mapped.copied().or(s.everyone) {
                return Ok(who.cx(actor, role));
            }
        }
        Err(OpError::Forbidden(
            "link your Discord account first: `/link CODE` with a code from the dashboard's \
             Discord page or `nebula user link-discord`"
                .into(),
        ))
    }

    /// A context for a server admin changing their server's settings (`/settings`) when they
    /// hold no Nebula role: [`ControlPlane::set_guild_settings`] lets them change only what
    /// grants no Nebula role.
    pub async fn discord_guild_admin(&self, who: &DiscordUser) -> Result<OpCtx, OpError> {
        if !who.guild_admin || who.guild.is_none() {
            return Err(OpError::Forbidden(
                "only the server's admins (Manage Server) change its settings".into(),
            ));
        }
        Ok(match self.discord_principal(who).await {
            Ok(cx) => cx,
            Err(_) => who.cx(format!("discord:{}", who.name), Role::Viewer),
        })
    }

    /// The newest actions taken through the bot (the audit log's `via: discord` rows).
    pub async fn discord_actions(
        &self,
        cx: &OpCtx,
        limit: u32,
    ) -> Result<Vec<crate::jobs::AuditRecord>, OpError> {
        self.authorize(cx, Op::ReadAudit)?;
        Ok(self.store.discord_actions(limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_codes_hash_the_same_however_they_are_typed() {
        assert_eq!(code_hash("ABCDE-FGH23"), code_hash("abcde fgh23"));
        assert_ne!(code_hash("ABCDE-FGH23"), code_hash("ABCDE-FGH24"));
    }

    #[test]
    fn settings_are_checked_before_they_are_stored() {
        let mut s = GuildSettings::default();
        assert_eq!(check_settings(&s), Ok(()));
        s.alerts.channel = "general".into();
        assert!(check_settings(&s).unwrap_err().contains("alerts.channel"));
        s.alerts.channel = "1234".into();
        s.moderation.rules.insert(
            "swearing".into(),
            nebula_types::api::discord::ModAction::Delete,
        );
        assert!(check_settings(&s).unwrap_err().contains("swearing"));
        s.moderation.rules.clear();
        s.nickname = "x".repeat(33);
        assert!(check_settings(&s).unwrap_err().contains("nickname"));
    }
}
