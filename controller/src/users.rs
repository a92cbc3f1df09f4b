//! Dashboard users: argon2 password hashes, browser sessions (a random token in a cookie; the
//! store keeps its SHA-256) each with its own CSRF token.

use std::time::{Duration, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::distributions::{Alphanumeric, DistString};
use uuid::Uuid;

use crate::authz::{Change, Op, OpCtx};
use crate::events::Event;
use crate::store::millis;
use crate::store::users::{SessionRecord, UserRecord};
use crate::{hash_secret, ControlPlane, OpError};

/// Password hashes computed at once for new users (argon2 takes ~19 MiB and tens of ms each);
/// sign-ins have their own budget in [`crate::signin`].
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Run an argon2 computation on a blocking thread, a bounded number at a time.
async fn hashing<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, OpError> {
    let _slot = HASHING
        .acquire()
        .await
        .map_err(|_| OpError::Invalid("the controller is stopping".into()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Invalid(format!("hashing the password: {e}")))
}

/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
pub const ROLES: [&str; 3] = ["admin", "operator", "viewer"];

fn random(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), len)
}

/// An argon2id hash in PHC format (default parameters, a random salt).
pub fn hash_password(password: &str) -> Result<String, OpError> {
    let salt = SaltString::encode_b64(random(16).as_bytes())
        .map_err(|e| OpError::Invalid(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| OpError::Invalid(format!("hashing the password: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

pub fn validate_username(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid username: 1-64 letters, digits, '.', '_', '-' or '@'"
        ))
    }
}

impl ControlPlane {
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        role: &str,
        cx: &OpCtx,
    ) -> Result<UserRecord, OpError> {
        self.authorize(cx, Op::ManageUsers)?;
        validate_username(username).map_err(OpError::Invalid)?;
        if !ROLES.contains(&role) {
            return Err(OpError::Invalid(format!(
                "unknown role `{role}`: use admin, operator or viewer"
            )));
        }
        if password.chars().count() < 8 || password.len() > 1024 {
            return Err(OpError::Invalid(
                "a password needs 8 to 1024 characters".into(),
            ));
        }
        let pw = password.to_owned();
        let password_hash = hashing(move || hash_password(&pw)).await??;
        let user = UserRecord {
            id: Uuid::now_v7(),
            username: username.to_owned(),
            password_hash,
            role: role.to_owned(),
            created_at: millis(SystemTime::now()),
        };
        if !self.store.insert_user(&user).await? {
            return Err(OpError::Conflict(format!(
                "a user named `{username}` exists already"
            )));
        }
        self.record(
            cx,
            Change {
                action: "user.create",
                target: username.to_owned(),
                detail: serde_json::json!({ "role": role }),
                event: Some(Event::UserCreated {
                    username: username.to_owned(),
                    role: role.to_owned(),
                    by: cx.actor.clone(),
                }),
            },
        );
        Ok(user)
    }

    /// A new API token for `name` with `role` (`ai` for the gateway only, or a user role),
    /// returned once; the same name replaces the old token.
    pub async fn create_api_token(
        &self,
        name: &str,
        role: &str,
        cx: &OpCtx,
    ) -> Result<String, OpError> {
        self.authorize(cx, Op::ManageApiTokens)?;
        if role != crate::authz::AI_ROLE && role != crate::authz::BOT_ROLE && !ROLES.contains(&role)
        {
            return Err(OpError::Invalid(format!(
                "role `{role}` is not one of ai, bot, viewer, operator, admin"
            )));
        }
        if !nebula_protocol::valid_name(name) || name == "admin" {
            return Err(OpError::Invalid(
                "a token name is 1-63 letters, digits, `-`, `_` or `.` (and not `admin`)".into(),
            ));
        }
        let token = format!(
            "nbl_{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 40)
        );
        self.store
            .upsert_api_token(name, &crate::hash_secret(&token), role)
            .await?;
        // A replaced token must stop working at once, not when its cache entry ages out.
        self.token_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.record(
            cx,
            Change {
                action: "api_token.create",
                target: name.to_owned(),
                detail: serde_json::json!({ "role": role }),
                event: Some(Event::ApiTokenCreated {
                    name: name.to_owned(),
                    role: role.to_owned(),
                    by: cx.actor.clone(),
                }),
            },
        );
        Ok(token)
    }

    /// At first start, with no user yet: an `admin` user with a random password (returned, to
    /// be shown once).
    pub async fn bootstrap_admin_user(&self) -> Result<Option<String>, OpError> {
        if self.store.count_users().await? > 0 {
            return Ok(None);
        }
        let password = random(20);
        match self
            .create_user("admin", &password, "admin", &OpCtx::internal("controller"))
            .await
        {
            Ok(_) => Ok(Some(password)),
            // Another start won the race.
            Err(OpError::Conflict(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Check a username and password from `source` (the client's address); on success a new
    /// session: (cookie token, session). Throttled per (username, source) and by a global
    /// hashing budget (see [`crate::signin`]); a refusal is `TooManyRequests`.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        source: std::net::IpAddr,
    ) -> Result<(String, SessionRecord), OpError> {
        if username.len() > 64 || password.len() > 1024 {
            return Err(OpError::Invalid("wrong username or password".into()));
        }
        let slot = self
            .signin
            .admit(username, source)
            .await
            .map_err(|e| OpError::TooManyRequests(e.to_string()))?;
        let user = self.store.user_by_name(username).await?;
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let pw = password.to_owned();
        // Verify even for an unknown user, so the answer takes as long either way.
        let ok = tokio::task::spawn_blocking(move || match hash {
            Some(h) => verify_password(&pw, &h),
            None => {
                let _ = hash_password(&pw);
                false
            }
        })
        .await
        .map_err(|e| OpError::Invalid(format!("checking the password: {e}")))?;
        drop(slot);
        let user = match (ok, user) {
            (true, Some(u)) => {
                self.signin.succeeded(username, source);
                u
            }
            _ => {
                if let Some(note) = self.signin.failed(username, source) {
                    self.audit(
                        username,
                        "user.login_failed",
                        username,
                        serde_json::json!({
                            "source": source.to_string(),
                            "failures": note.failures,
                            "suppressed_elsewhere": note.suppressed,
                        }),
                    );
                }
                return Err(OpError::Invalid("wrong username or password".into()));
            }
        };
        let token = random(40);
        let csrf = random(32);
        let now = millis(SystemTime::now());
        let expires_at = now + SESSION_TTL.as_millis() as i64;
        self.store
            .insert_ui_session(&hash_secret(&token), user.id, &csrf, now, expires_at)
            .await?;
        let _ = self.store.expire_ui_sessions(now).await;
        self.audit(
            &user.username,
            "user.login",
            &user.username,
            serde_json::json!({}),
        );
        Ok((
            token,
            SessionRecord {
                user,
                csrf,
                expires_at,
            },
        ))
    }

    pub async fn ui_session(&self, token: &str) -> Result<Option<SessionRecord>, OpError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        Ok(self
            .store
            .ui_session(&hash_secret(token), millis(SystemTime::now()))
            .await?)
    }

    pub async fn logout(&self, token: &str) -> Result<(), OpError> {
        Ok(self.store.delete_ui_session(&hash_secret(token)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn usernames_are_checked() {
        assert!(validate_username("ana.maria@home").is_ok());
        assert!(validate_username("").is_err());
        assert!(validate_username("a b").is_err());
        assert!(validate_username(&"x".repeat(65)).is_err());
    }
}
