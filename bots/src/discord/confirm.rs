//! Destructive actions wait for their confirmation: the command is deferred (Discord's 3 s
//! window), its effect is shown with Confirm and Cancel buttons visible to its user only, and
//! only that user's click within the time limit runs it, as the same user and role.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::Principal;
use serenity::all::{
    ButtonStyle, CommandInteraction, ComponentInteraction, CreateActionRow, CreateButton,
    CreateInteractionResponse, CreateInteractionResponseMessage, EditInteractionResponse,
};

use super::{clip, fleet, Bot};

/// What runs once confirmed.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Make the fleet match the map in force now (a reconcile).
    Deploy,
    Rollback {
        service: String,
    },
    Wake {
        node: String,
    },
    Sleep {
        node: String,
    },
    Run {
        node: String,
        op: String,
        args: Vec<String>,
    },
}

impl Action {
    fn what(&self) -> String {
        match self {
            Action::Deploy => "deploy the service map in force".into(),
            Action::Rollback { service } => format!("roll back `{service}`"),
            Action::Wake { node } => format!("wake `{node}`"),
            Action::Sleep { node } => format!("put `{node}` to sleep"),
            Action::Run { node, op, args } => {
                format!(
                    "run `{}` on `{node}`",
                    format!("{op} {}", args.join(" ")).trim()
                )
            }
        }
    }
}

struct Entry {
    user: String,
    principal: Principal,
    action: Action,
    at: Instant,
}

pub(crate) struct Pending {
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Pending {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ask `cmd`'s user to confirm `action` (the command was deferred); `detail` says what it
/// will change.
pub(crate) async fn ask(
    bot: &Bot,
    cmd: &CommandInteraction,
    principal: Principal,
    action: Action,
    detail: &str,
) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let ttl = bot.confirm.ttl;
    {
        let mut entries = bot.confirm.lock();
        entries.retain(|_, e| e.at.elapsed() < ttl);
        entries.insert(
            id.clone(),
            Entry {
                user: cmd.user.id.to_string(),
                principal,
                action: action.clone(),
                at: Instant::now(),
            },
        );
    }
    let text = format!(
        "**Confirm:** {}?\n{detail}\n-# Only you can confirm, within {}.",
        action.what(),
        humanize(ttl)
    );
    let buttons = CreateActionRow::Buttons(vec![
        CreateButton::new(format!("nebula:confirm:{id}"))
            .label("Confirm")
            .style(ButtonStyle::Danger),
        CreateButton::new(format!("nebula:cancel:{id}"))
            .label("Cancel")
            .style(ButtonStyle::Secondary),
    ]);
    if let Err(e) = cmd
        .edit_response(
            &bot.http,
            EditInteractionResponse::new()
                .content(clip(&text))
                .components(vec![buttons]),
        )
        .await
    {
        tracing::warn!("could not ask for a confirmation: {e}");
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} minute{}", s / 60, if s == 60 { "" } else { "s" })
    } else {
        format!("{s} s")
    }
}

/// A Confirm or Cancel click.
pub(crate) async fn clicked(bot: &Arc<Bot>, c: &ComponentInteraction, id: &str, confirm: bool) {
    let clicker = c.user.id.to_string();
    let outcome = {
        let mut entries = bot.confirm.lock();
        match entries.get(id) {
            None => Err("This confirmation has expired or was already answered."),
            Some(e) if e.user != clicker => Err("Only the person who asked can confirm this."),
            Some(e) if e.at.elapsed() >= bot.confirm.ttl => {
                entries.remove(id);
                Ok(None)
            }
            Some(_) => Ok(entries.remove(id)),
        }
    };
    let entry = match outcome {
        Err(why) => {
            tracing::info!(user = %clicker, "a confirmation click refused: {why}");
            let msg = CreateInteractionResponseMessage::new()
                .content(format!("⛔ {why}"))
                .ephemeral(true);
            let _ = c
                .create_response(&bot.http, CreateInteractionResponse::Message(msg))
                .await;
            return;
        }
        Ok(None) => {
            let _ = update(bot, c, "⌛ Expired: nothing was done.").await;
            return;
        }
        Ok(Some(e)) => e,
    };
    if !confirm {
        let _ = update(bot, c, "Cancelled: nothing was done.").await;
        return;
    }
    let _ = update(bot, c, &format!("⏳ Running: {}…", entry.action.what())).await;
    fleet::run_confirmed(bot, c, &entry.principal, entry.action).await;
}

/// Replace the message the buttons were on (and drop the buttons).
async fn update(bot: &Bot, c: &ComponentInteraction, text: &str) -> serenity::Result<()> {
    let msg = CreateInteractionResponseMessage::new()
        .content(clip(text))
        .components(Vec::new());
    c.create_response(&bot.http, CreateInteractionResponse::UpdateMessage(msg))
        .await
}
