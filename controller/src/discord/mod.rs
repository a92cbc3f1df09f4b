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
use nebula_types::api::discord::{
    BotStatus, DiscordLink, GuildChanges, GuildSettings, GuildView, LinkCode, Moderated,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use crate::authz::{Change, Op, OpCtx, Role, Via};
use crate::store::discord::GuildRecord;
use crate::{ControlPlane, OpError};

mod checks;
pub mod remote;

pub use checks::{check_settings, check_user};
pub(crate) use checks::{user_from_headers, valid_snowflake};

/// How long a link code stays valid.
pub const LINK_CODE_TTL: Duration = Duration::from_secs(15 * 60);
/// The output-filter rules moderation can act on.
pub use nebula_ai_filters::RULE_KINDS as MODERATION_RULES;
/// The token stored from the dashboard, in the data dir.
pub const TOKEN_FILE: &str = "discord.token";
/// The fleet secret a token saved from the dashboard is kept in.
pub const TOKEN_SECRET: &str = "nebula.discord-token";
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

/// The last changes of servers' settings, numbered within this process's run (`epoch`).
struct ChangeLog {
    epoch: String,
    seq: u64,
    recent: std::collections::VecDeque<(u64, String)>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self {
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            seq: 0,
            recent: std::collections::VecDeque::new(),
        }
    }
}

impl ChangeLog {
    const KEEP: usize = 256;

    fn since(&self, since: Option<(&str, u64)>) -> GuildChanges {
        let mut out = GuildChanges {
            epoch: self.epoch.clone(),
            seq: self.seq,
            ..GuildChanges::default()
        };
        let Some((epoch, since)) = since else {
            return out;
        };
        let oldest = self.recent.front().map_or(self.seq + 1, |(s, _)| *s);
        // Another run of the controller (it restarted), or older than what is kept: look at
        // every server.
        out.all = epoch != self.epoch || since > self.seq || since + 1 < oldest;
        if !out.all {
            out.guilds = self
                .recent
                .iter()
                .filter(|(s, _)| *s > since)
                .map(|(_, g)| g.clone())
                .collect();
            out.guilds.dedup();
        }
        out
    }
}

/// The bot's state inside the control plane.
pub struct DiscordBook {
    guilds: Mutex<HashMap<String, Arc<GuildSettings>>>,
    status: Mutex<BotStatus>,
    /// Servers whose settings changed, in order (the bot registers their commands again).
    changes: Mutex<ChangeLog>,
    changed: tokio::sync::Notify,
    /// A bot in its own process (`nebula bot`), when one is attached.
    pub remote: remote::Remote,
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
                remote: None,
            }),
            changes: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            remote: remote::Remote::default(),
            token_changed: tokio::sync::Notify::new(),
        }
    }
}

impl DiscordBook {
    pub fn status(&self) -> BotStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // A bot process that stopped calling is gone.
        if s.remote.is_some() && self.remote.live().is_none() {
            s.remote = None;
            s.connected = false;
            s.account = None;
            s.application_id = None;
        }
        s
    }

    pub fn set_status(&self, f: impl FnOnce(&mut BotStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn note_change(&self, guild: &str) {
        let mut log = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        log.seq += 1;
        let seq = log.seq;
        log.recent.push_back((seq, guild.to_owned()));
        if log.recent.len() > ChangeLog::KEEP {
            log.recent.pop_front();
        }
        drop(log);
        self.changed.notify_waiters();
    }

    /// Servers whose settings changed after `since` (the epoch and number of an earlier answer;
    /// `None`: from now on), waiting up to `wait` for one when there is none yet.
    pub async fn changes_since(&self, since: Option<(&str, u64)>, wait: Duration) -> GuildChanges {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let answer = {
                let log = self.changes.lock().unwrap_or_else(|e| e.into_inner());
                log.since(since)
            };
            if answer.all || !answer.guilds.is_empty() || since.is_none() {
                return answer;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return answer;
            }
        }
    }
}

pub use nebula_types::api::discord::DiscordUser;

fn origin(who: &DiscordUser) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert(
        "discord".into(),
        json!({ "user": who.id, "name": who.name, "guild": who.guild }),
    );
    m
}

/// `cx` with the name of the `bot` API token that asked (a bot in its own process), for the
/// audit row beside the Discord user.
pub(crate) fn by_bot(mut cx: OpCtx, bot: Option<&str>) -> OpCtx {
    if let (Some(o), Some(b)) = (cx.origin.as_mut(), bot) {
        o.insert("bot".into(), b.into());
    }
    cx
}

/// A context for `role` on this user's behalf, named `actor`.
fn cx_for(who: &DiscordUser, actor: String, role: Role) -> OpCtx {
    let mut cx = OpCtx::new(actor, role, Via::Discord);
    cx.origin = Some(origin(who));
    cx
}

fn now() -> i64 {
    nebula_protocol::time::UnixMillis::now().as_i64()
}

fn rfc3339(ms: i64) -> String {
    crate::store::rfc3339_millis(crate::store::from_millis(ms))
}

fn code_hash(code: &str) -> String {
    let normal: String = code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex::encode(sha2::Sha256::digest(normal.as_bytes()))
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
            // Not cached: any id may be asked about, only known servers are kept.
            None => return Ok(Arc::new(GuildSettings::default())),
        };
        let settings = Arc::new(settings);
        self.discord
            .guilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guild.to_owned(), settings.clone());
        Ok(settings)
    }

    /// The bot's token: `[discord] token_file` when set, else the one saved from the dashboard
    /// (the fleet secret [`TOKEN_SECRET`], sealed in the database, so that whichever replica
    /// leads has it; before that, `discord.token` in the data dir); `None` when there is none.
    pub async fn discord_token(&self) -> Option<String> {
        let text = match &self.config.discord.token_file {
            Some(path) => std::fs::read_to_string(path).ok(),
            None => match self.reveal_secret(TOKEN_SECRET, None).await {
                Ok((_, v)) => Some(v.expose().to_owned()),
                Err(_) => std::fs::read_to_string(self.config.data_dir.join(TOKEN_FILE)).ok(),
            },
        };
        text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
    }

    /// Store the bot's token as the fleet secret [`TOKEN_SECRET`] and (re)connect the bot with
    /// it. Refused when `[discord] token_file` is set (that file is the token then).
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
        if let Some(host) = self.discord.remote.live() {
            return Err(OpError::Conflict(format!(
                "the bot runs as `nebula bot` on `{host}`: one gateway connection per token"
            )));
        }
        self.store_secret_checked(cx, TOKEN_SECRET, &crate::secrets::SecretValue::new(token))
            .await?;
        // A token saved by an older version in the data dir is superseded.
        let _ = std::fs::remove_file(self.config.data_dir.join(TOKEN_FILE));
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
        self.discord.note_change(guild);
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
    /// `/link CODE` (`bot`: the API token of a bot in its own process that asked).
    pub async fn redeem_discord_link(
        &self,
        who: &DiscordUser,
        code: &str,
        bot: Option<&str>,
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
            &by_bot(cx_for(who, user.clone(), role), bot),
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
                return Ok(cx_for(who, u.username, Role::parse(&u.role)));
            }
        }
        let actor = format!("discord:{}", who.name);
        if let Some(guild) = &who.guild {
            let s = self.guild_settings(guild).await?;
            let mapped = who.roles.iter().filter_map(|r| s.roles.get(r)).max();
            if let Some(role) = mapped.copied().or(s.everyone) {
                return Ok(cx_for(who, actor, role));
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
            Err(_) => cx_for(who, format!("discord:{}", who.name), Role::Viewer),
        })
    }

    /// The message an alert was posted as in a channel.
    pub async fn discord_alert_message(
        &self,
        fingerprint: &str,
        channel: &str,
    ) -> Result<Option<String>, OpError> {
        Ok(self
            .store
            .discord_alert_message(fingerprint, channel)
            .await?)
    }

    /// Remember the message an alert was posted as (a month: older ones are not edited again).
    pub async fn remember_discord_alert_message(
        &self,
        fingerprint: &str,
        channel: &str,
        message: &str,
    ) -> Result<(), OpError> {
        self.store
            .put_discord_alert_message(fingerprint, channel, message, now())
            .await?;
        let _ = self
            .store
            .prune_discord_alert_messages(now() - 31 * 86_400_000)
            .await;
        Ok(())
    }

    /// A bot in its own process attaches (or says again that it holds the connection).
    pub async fn attach_remote_bot(
        &self,
        who: &nebula_types::api::discord::BotAttach,
    ) -> Result<BotStatus, OpError> {
        if self.discord_token().await.is_some() {
            return Err(OpError::Conflict(
                "this controller runs the Discord bot itself (it has a token): one gateway \
                 connection per token"
                    .into(),
            ));
        }
        self.discord.remote.attach(who)?;
        self.discord.set_status(|s| {
            s.connected = who.connected;
            s.account.clone_from(&who.account);
            s.application_id.clone_from(&who.application_id);
            s.remote = Some(who.host.clone());
        });
        Ok(self.discord.status())
    }

    pub fn detach_remote_bot(&self, instance: &str) {
        if self.discord.remote.detach(instance) {
            self.discord.set_status(|s| {
                s.connected = false;
                s.remote = None;
                s.account = None;
                s.application_id = None;
            });
        }
    }

    /// Record a message the bot moderated (the author is not a principal: nothing runs as them).
    pub fn discord_moderated(&self, who: &DiscordUser, m: &Moderated, bot: Option<&str>) {
        let mut detail = origin(who);
        if let Some(b) = bot {
            detail.insert("bot".into(), b.into());
        }
        detail.insert("via".into(), "discord".into());
        detail.insert("channel".into(), m.channel.clone().into());
        detail.insert("action".into(), m.action.clone().into());
        detail.insert("hits".into(), json!(m.hits));
        self.audit(
            &format!("discord:{}", who.name),
            "discord.moderation",
            &m.message,
            serde_json::Value::Object(detail),
        );
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
    fn the_change_log_says_what_changed_and_when_to_look_at_everything() {
        let mut log = ChangeLog::default();
        let epoch = log.epoch.clone();
        let at = |n: u64| Some((epoch.as_str(), n));
        assert_eq!(log.since(None).seq, 0);
        assert!(log.since(at(0)).guilds.is_empty());
        for g in ["1", "2", "2"] {
            log.seq += 1;
            log.recent.push_back((log.seq, g.to_owned()));
        }
        let c = log.since(at(1));
        assert_eq!(
            (c.seq, c.guilds.clone(), c.all),
            (3, vec!["2".to_owned()], false)
        );
        // Another run of the controller: look at every server, whatever the numbers.
        assert!(log.since(Some(("earlier-run", 1))).all);
        assert!(log.since(at(9)).all);
        log.recent.pop_front();
        assert!(!log.since(at(1)).all, "the change after 1 is still kept");
        assert!(log.since(at(0)).all, "the change after 0 was dropped");
    }

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
