//! A bot in its own process (`nebula bot`, with a `bot` API token) against this controller. It
//! attaches (one process at a time: one gateway connection per token), says again every few
//! seconds that it holds the connection, and long-polls for the alert notifications to post
//! in Discord. A notification handed to it waits for its outcome; one it does not report in
//! time, or one made while no bot is attached, fails, and the notification outbox retries it
//! as it retries any sink.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nebula_types::api::discord::{AlertDelivery, BotAttach};
use tokio::sync::oneshot;

use crate::OpError;

/// An attached bot that has not been heard from for this long is gone.
pub const ATTACH_TTL: Duration = Duration::from_secs(45);
/// How long a handed-over notification waits for its outcome.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// A bot process that has not asked for notifications for this long is not taking them (the
/// outbox's other sinks do not wait on it).
pub const POLL_GAP: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Remote {
    attached: Mutex<Option<Attached>>,
    queue: Mutex<VecDeque<AlertDelivery>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Result<(), String>>>>,
    arrived: tokio::sync::Notify,
    /// Long polls for notifications in progress, and when the last one ended.
    polls: Mutex<(usize, Option<Instant>)>,
}

/// One long poll in progress (counted until dropped).
struct Polling<'a>(&'a Remote);

impl<'a> Polling<'a> {
    fn start(r: &'a Remote) -> Self {
        r.polls.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Polling(r)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut p = self.0.polls.lock().unwrap_or_else(|e| e.into_inner());
        p.0 = p.0.saturating_sub(1);
        p.1 = Some(Instant::now());
    }
}

struct Attached {
    instance: String,
    host: String,
    seen: Instant,
}

impl Remote {
    /// Attach `who`, or say it again. Refused while another process holds the connection.
    pub fn attach(&self, who: &BotAttach) -> Result<(), OpError> {
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = a.as_ref() {
            if cur.instance != who.instance && cur.seen.elapsed() < ATTACH_TTL {
                return Err(OpError::Conflict(format!(
                    "a bot process on `{}` holds this controller's Discord connection",
                    cur.host
                )));
            }
        }
        *a = Some(Attached {
            instance: who.instance.clone(),
            host: who.host.clone(),
            seen: Instant::now(),
        });
        Ok(())
    }

    /// The process said it stops.
    pub fn detach(&self, instance: &str) -> bool {
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if a.as_ref().is_some_and(|c| c.instance == instance) {
            *a = None;
            return true;
        }
        false
    }

    /// The attached process's host, while it is live.
    pub fn live(&self) -> Option<String> {
        let a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        a.as_ref()
            .filter(|c| c.seen.elapsed() < ATTACH_TTL)
            .map(|c| c.host.clone())
    }

    /// Is `instance` the attached process? (It is seen again.)
    fn touch(&self, instance: &str) -> bool {
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        match a.as_mut() {
            Some(c) if c.instance == instance => {
                c.seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Is the attached process asking for notifications (now, or a moment ago)?
    fn taking(&self) -> bool {
        let p = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        p.0 > 0 || p.1.is_some_and(|t| t.elapsed() < POLL_GAP)
    }

    /// Hand a notification to the attached process and wait for how it went.
    pub async fn deliver(&self, sink: &str, url: &str, body: &str) -> Result<(), String> {
        if self.live().is_none() {
            return Err("the Discord bot is not connected".into());
        }
        if !self.taking() {
            return Err("the Discord bot process is not taking notifications now".into());
        }
        let id = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(AlertDelivery {
                id: id.clone(),
                sink: sink.to_owned(),
                url: url.to_owned(),
                body: body.to_owned(),
            });
        self.arrived.notify_waiters();
        let outcome = tokio::time::timeout(DELIVERY_TIMEOUT, rx).await;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        // Not taken yet: it must not be posted after the outbox has given up on this try.
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d.id != id);
        match outcome {
            Ok(Ok(r)) => r,
            _ => Err("the Discord bot did not report the delivery in time".into()),
        }
    }

    /// The notifications for `instance` to post, waiting up to `wait` for one.
    pub async fn take(
        &self,
        instance: &str,
        wait: Duration,
    ) -> Result<Vec<AlertDelivery>, OpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut polling = None;
        loop {
            if !self.touch(instance) {
                return Err(OpError::Conflict(
                    "this bot process is not attached (PUT /api/v1/discord/bot/attach first)"
                        .into(),
                ));
            }
            polling.get_or_insert_with(|| Polling::start(self));
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch: Vec<AlertDelivery> = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = q.len().min(20);
                q.drain(..n).collect()
            };
            if !batch.is_empty() {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// How a delivery went; `false` when nothing waits for it (it timed out).
    pub fn report(&self, id: &str, outcome: Result<(), String>) -> bool {
        let tx = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        tx.is_some_and(|tx| tx.send(outcome).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(instance: &str) -> BotAttach {
        BotAttach {
            instance: instance.into(),
            host: format!("host-{instance}"),
            connected: true,
            account: None,
            application_id: None,
        }
    }

    #[tokio::test]
    async fn one_process_holds_the_connection_and_reports_each_delivery() {
        let r = std::sync::Arc::new(Remote::default());
        assert_eq!(
            r.deliver("s", "discord:1/2", "{}").await.unwrap_err(),
            "the Discord bot is not connected"
        );
        r.attach(&attach("a")).unwrap();
        assert!(
            r.attach(&attach("b")).is_err(),
            "a second process is refused"
        );
        assert!(r.take("b", Duration::ZERO).await.is_err());
        assert!(
            r.deliver("s", "discord:1/2", "{}").await.is_err(),
            "attached but not asking for notifications: nothing waits on it"
        );
        assert!(r.take("a", Duration::ZERO).await.unwrap().is_empty());
        let r2 = r.clone();
        let sent = tokio::spawn(async move { r2.deliver("s", "discord:1/2", "{}").await });
        let got = r.take("a", Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].url, "discord:1/2");
        assert!(r.report(&got[0].id, Err("no access".into())));
        assert_eq!(sent.await.unwrap().unwrap_err(), "no access");
        assert!(!r.report(&got[0].id, Ok(())), "reported once");
        assert!(r.detach("a"));
        r.attach(&attach("b")).unwrap();
        assert_eq!(r.live().as_deref(), Some("host-b"));
    }
}
