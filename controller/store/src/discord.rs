//! The Discord bot's state: per-server settings, linked accounts, one-time link codes, and the
//! messages alerts were posted as.

use sqlx::Row;

use super::{Store, StoreError};

/// A server the bot has seen, with its settings (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuildRecord {
    pub guild_id: String,
    pub name: String,
    pub settings: String,
    pub updated_by: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    pub discord_user: String,
    pub discord_name: String,
    pub username: String,
    pub linked_at: i64,
}

fn link_row(r: &sqlx::any::AnyRow) -> Result<LinkRecord, StoreError> {
    Ok(LinkRecord {
        discord_user: r.try_get("discord_user")?,
        discord_name: r.try_get("discord_name")?,
        username: r.try_get("username")?,
        linked_at: r.try_get("linked_at")?,
    })
}

fn guild_row(r: &sqlx::any::AnyRow) -> Result<GuildRecord, StoreError> {
    Ok(GuildRecord {
        guild_id: r.try_get("guild_id")?,
        name: r.try_get("name")?,
        settings: r.try_get("settings")?,
        updated_by: r.try_get("updated_by")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    pub async fn discord_guilds(&self) -> Result<Vec<GuildRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT guild_id, name, settings, updated_by, updated_at FROM discord_guilds \
             ORDER BY name, guild_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(guild_row).collect()
    }

    pub async fn discord_guild(&self, id: &str) -> Result<Option<GuildRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT guild_id, name, settings, updated_by, updated_at FROM discord_guilds \
             WHERE guild_id = $1",
        )
        .bind(id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(guild_row).transpose()
    }

    pub async fn put_discord_guild(&self, g: &GuildRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_guilds (guild_id, name, settings, updated_by, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (guild_id) DO UPDATE SET \
             name = excluded.name, settings = excluded.settings, \
             updated_by = excluded.updated_by, updated_at = excluded.updated_at",
        )
        .bind(g.guild_id.clone())
        .bind(g.name.clone())
        .bind(g.settings.clone())
        .bind(g.updated_by.clone())
        .bind(g.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record a server the bot joined (its settings stay as they are when it is known).
    pub async fn seen_discord_guild(
        &self,
        id: &str,
        name: &str,
        default_settings: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_guilds (guild_id, name, settings, updated_by, updated_at) \
             VALUES ($1, $2, $3, 'discord', $4) ON CONFLICT (guild_id) DO UPDATE SET \
             name = CASE WHEN excluded.name = '' THEN discord_guilds.name ELSE excluded.name END",
        )
        .bind(id.to_owned())
        .bind(name.to_owned())
        .bind(default_settings.to_owned())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn put_discord_link_code(
        &self,
        code_hash: &str,
        username: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_link_codes (code_hash, username, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(code_hash.to_owned())
        .bind(username.to_owned())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Use a link code once: link `discord_user` to the code's user when the code exists and has
    /// not expired at `now` (expired codes are removed too). The user's name, or `None`.
    pub async fn redeem_discord_link_code(
        &self,
        code_hash: &str,
        discord_user: &str,
        discord_name: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM discord_link_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT username FROM discord_link_codes WHERE code_hash = $1")
            .bind(code_hash.to_owned())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let username: String = row.try_get("username")?;
        sqlx::query("DELETE FROM discord_link_codes WHERE code_hash = $1")
            .bind(code_hash.to_owned())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO discord_links (discord_user, discord_name, username, linked_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (discord_user) DO UPDATE SET \
             discord_name = excluded.discord_name, username = excluded.username, \
             linked_at = excluded.linked_at",
        )
        .bind(discord_user.to_owned())
        .bind(discord_name.to_owned())
        .bind(username.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(username))
    }

    pub async fn discord_link(&self, discord_user: &str) -> Result<Option<LinkRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT discord_user, discord_name, username, linked_at FROM discord_links \
             WHERE discord_user = $1",
        )
        .bind(discord_user.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(link_row).transpose()
    }

    pub async fn discord_links(&self) -> Result<Vec<LinkRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT discord_user, discord_name, username, linked_at FROM discord_links \
             ORDER BY username, discord_user",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(link_row).collect()
    }

    pub async fn delete_discord_link(&self, discord_user: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM discord_links WHERE discord_user = $1")
            .bind(discord_user.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn put_discord_alert_message(
        &self,
        fingerprint: &str,
        channel_id: &str,
        message_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_alert_messages (fingerprint, channel_id, message_id, posted_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (fingerprint, channel_id) DO UPDATE SET \
             message_id = excluded.message_id, posted_at = excluded.posted_at",
        )
        .bind(fingerprint.to_owned())
        .bind(channel_id.to_owned())
        .bind(message_id.to_owned())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The message an alert was last posted as in a channel.
    pub async fn discord_alert_message(
        &self,
        fingerprint: &str,
        channel_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT message_id FROM discord_alert_messages \
             WHERE fingerprint = $1 AND channel_id = $2",
        )
        .bind(fingerprint.to_owned())
        .bind(channel_id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("message_id")).transpose()?)
    }

    /// Forget alert messages posted before `before` (their alerts are long resolved).
    pub async fn prune_discord_alert_messages(&self, before: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM discord_alert_messages WHERE posted_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// The newest audit entries made through the Discord bot.
    pub async fn discord_actions(
        &self,
        limit: u32,
    ) -> Result<Vec<nebula_types::jobs::AuditRecord>, StoreError> {
        self.list_audit(&crate::jobs::AuditFilter {
            actor: None,
            action: None,
            before: None,
            via: Some("discord".into()),
            limit,
        })
        .await
    }
}
