//! Replicas and the leader election.
//!
//! Controllers on one PostgreSQL are replicas of one control plane. Each registers itself in
//! the `replicas` table and runs the `leader-election` task: a follower tries to take the lease
//! every `poll` (and at once when a leader announces its release); the leader renews it every
//! `renew`. Leadership is a [`watch`] the task driver follows: leader tasks start when it turns
//! true and are cancelled by their own tokens when it turns false.
//!
//! The leader steps down by itself, without waiting for the database, when a renewal has not
//! succeeded within `lease_ttl - margin` of the moment the last successful one was sent: the
//! database's lease outlives that moment, so two replicas never both believe they lead for
//! long, and the fence ([`Ha::fence`], checked by the store in each leader-only write's own
//! transaction) refuses whatever a deposed leader still tries.
//!
//! On SQLite there is one controller; it always leads and nothing is fenced.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::lease::{Fence, ReplicaRecord, LEADER_CHANNEL};
use crate::store::{millis, Backend, Store};
use crate::tasks::Leadership;
use crate::OpError;

/// `[ha]` in the controller's config: the lease's timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// How long a lease lasts without renewal. A leader that dies is replaced within about
    /// this long (plus `poll`).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the leader renews.
    #[serde(with = "humantime_serde")]
    pub renew: Duration,
    /// How often a follower tries to take a free lease.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// How often the leader spreads agent sessions over the replicas (a few at a time).
    #[serde(with = "humantime_serde")]
    pub balance_interval: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(6),
            renew: Duration::from_secs(2),
            poll: Duration::from_secs(1),
            balance_interval: Duration::from_secs(30),
        }
    }
}

impl HaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.renew.is_zero() || self.poll.is_zero() {
            return Err("[ha] renew and poll must be above zero".into());
        }
        if self.balance_interval < Duration::from_millis(100) {
            return Err("[ha] balance_interval must be at least 100ms".into());
        }
        if self.lease_ttl < self.renew * 2 + self.margin() {
            return Err(format!(
                "[ha] lease_ttl ({}) must be at least twice renew plus {} ms",
                humantime::format_duration(self.lease_ttl),
                self.margin().as_millis()
            ));
        }
        Ok(())
    }

    /// How long before the lease's end the leader stops believing it leads.
    fn margin(&self) -> Duration {
        (self.lease_ttl / 6).max(Duration::from_millis(100))
    }
}

/// This replica's place in the control plane.
pub struct Ha {
    pub replica: String,
    hostname: String,
    started_at: i64,
    /// `None` on SQLite (always the leader).
    state: Option<Mutex<Option<Fence>>>,
    leading: watch::Sender<bool>,
    /// Where this replica is reached, once the listeners are bound.
    addresses: Mutex<(String, String)>,
    /// Every live replica's QUIC address (sessions send it to agents), and the leader's.
    quic_addrs: watch::Sender<Arc<Vec<String>>>,
    /// The leader's QUIC address and HTTP URL, when known.
    leader_at: Mutex<Option<(String, String)>>,
    /// The client requests are passed on to the leader with.
    client: std::sync::OnceLock<reqwest::Client>,
    /// Until when this replica may act as the leader, by its own clock (the last good
    /// renewal's send time plus the lease less the margin); `None` while it follows.
    valid_until: Mutex<Option<Instant>>,
    /// When the main runtime last ran the election's heartbeat: the election (on its own
    /// thread) does not renew for a controller whose main runtime is stuck.
    main_beat: Mutex<Instant>,
}

impl Ha {
    pub fn new(backend: Backend) -> Self {
        let replicated = backend == Backend::Postgres;
        let (leading, _) = watch::channel(!replicated);
        Self {
            replica: uuid::Uuid::new_v4().simple().to_string(),
            hostname: hostname(),
            started_at: millis(SystemTime::now()),
            state: replicated.then(|| Mutex::new(None)),
            leading,
            addresses: Mutex::new((String::new(), String::new())),
            quic_addrs: watch::channel(Arc::new(Vec::new())).0,
            leader_at: Mutex::new(None),
            client: std::sync::OnceLock::new(),
            valid_until: Mutex::new(None),
            main_beat: Mutex::new(Instant::now()),
        }
    }

    /// Whether this controller is one of several replicas (PostgreSQL).
    pub fn replicated(&self) -> bool {
        self.state.is_some()
    }

    pub fn leadership(&self) -> Leadership {
        if self.replicated() {
            Leadership::from_watch(self.leading.subscribe())
        } else {
            Leadership::always()
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Follows whether this replica leads (sessions end when it stops leading).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Every live replica's QUIC address, for agents (1.9); empty on SQLite.
    pub fn quic_addrs(&self) -> watch::Receiver<Arc<Vec<String>>> {
        self.quic_addrs.subscribe()
    }

    /// The leader's QUIC address, when known (named to agents this replica turns away).
    pub fn leader_quic(&self) -> Option<String> {
        lock(&self.leader_at).as_ref().map(|(q, _)| q.clone())
    }

    /// This replica's own QUIC address (as agents and other replicas reach it).
    pub fn quic_addr(&self) -> String {
        lock(&self.addresses).1.clone()
    }

    /// The leader's HTTP URL, when known (followers pass requests on to it).
    pub fn leader_http(&self) -> Option<String> {
        lock(&self.leader_at)
            .as_ref()
            .map(|(_, h)| h.clone())
            .filter(|h| !h.is_empty())
    }

    /// Read the lease and the live replicas: who leads, and every replica's address.
    async fn refresh(&self, store: &Store, cfg: &HaConfig) {
        let window = i64::try_from((cfg.lease_ttl * 3).as_millis()).unwrap_or(60_000);
        let (lease, replicas) = match (store.lease().await, store.replicas(window).await) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => {
                warn!("reading the replica list: {e:#}");
                return;
            }
        };
        let holder = lease.map(|l| l.holder).unwrap_or_default();
        *lock(&self.leader_at) = replicas
            .iter()
            .find(|r| r.id == holder)
            .map(|r| (r.quic_addr.clone(), r.http_url.clone()));
        let addrs: Vec<String> = replicas.into_iter().map(|r| r.quic_addr).collect();
        self.quic_addrs.send_if_modified(|cur| {
            let changed = **cur != addrs;
            if changed {
                *cur = Arc::new(addrs);
            }
            changed
        });
    }

    /// The fence a leader-only write carries: `None` on SQLite, this replica's term while it
    /// leads, and a refusal otherwise.
    pub fn fence(&self) -> Result<Option<Fence>, OpError> {
        match &self.state {
            None => Ok(None),
            Some(s) => match lock(s).clone() {
                Some(f) if self.lease_valid() => Ok(Some(f)),
                _ => Err(OpError::Conflict(
                    "this replica does not lead (a leader-only write was refused)".into(),
                )),
            },
        }
    }

    /// Whether this replica may act as the leader now, by its own clock: always on SQLite;
    /// on PostgreSQL only before its lease (as last renewed) could have run out. Checked right
    /// before a side effect that a deposed leader must not cause (a job sent to an agent): a
    /// process that was paused past its lease finds it false the moment it wakes, before its
    /// election loop has run.
    pub fn lease_valid(&self) -> bool {
        if !self.replicated() {
            return true;
        }
        lock(&self.valid_until).is_some_and(|t| Instant::now() < t)
    }

    fn valid_until(&self, until: Option<Instant>) {
        *lock(&self.valid_until) = until;
    }

    /// The current term while this replica leads.
    pub fn term(&self) -> Option<i64> {
        self.state
            .as_ref()
            .and_then(|s| lock(s).as_ref().map(|f| f.term))
    }

    /// Where this replica is reached: the configured public URL and address, else the bound
    /// listeners.
    pub fn listening(
        &self,
        config: &crate::ControllerConfig,
        https: bool,
        http: std::net::SocketAddr,
        quic: std::net::SocketAddr,
    ) -> anyhow::Result<()> {
        // Other replicas and agents reach this one by these: a wildcard address will not do.
        if self.replicated() {
            anyhow::ensure!(
                config.public_url.is_some() || !http.ip().is_unspecified(),
                "replicas on PostgreSQL need --public-url (how the other replicas reach this one's HTTP listener, {http})"
            );
            anyhow::ensure!(
                config.public_address.is_some() || !quic.ip().is_unspecified(),
                "replicas on PostgreSQL need --public-address (how agents reach this one's QUIC listener, {quic})"
            );
        }
        let scheme = if https { "https" } else { "http" };
        let http_url = (config.public_url.clone()).unwrap_or_else(|| format!("{scheme}://{http}"));
        let quic_addr = (config.public_address.clone()).unwrap_or_else(|| quic.to_string());
        *lock(&self.addresses) = (http_url, quic_addr);
        Ok(())
    }

    fn record(&self) -> ReplicaRecord {
        let (http_url, quic_addr) = lock(&self.addresses).clone();
        ReplicaRecord {
            id: self.replica.clone(),
            hostname: self.hostname.clone(),
            http_url,
            quic_addr,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: self.started_at,
            seen_at: millis(SystemTime::now()),
        }
    }

    fn lead(&self, term: Option<i64>) {
        if term.is_none() {
            self.valid_until(None);
        }
        if let Some(s) = &self.state {
            *lock(s) = term.map(|term| Fence {
                holder: self.replica.clone(),
                term,
            });
        }
        self.leading.send_replace(term.is_some());
    }

    /// The `leader-election` task: runs until cancelled (then steps down; the lease is
    /// released by [`Ha::release`] once every task has stopped).
    ///
    /// The election runs on a thread and runtime of its own, with its own database
    /// connections: a runtime busy with thousands of agents' handshakes (a reconnection storm)
    /// cannot delay a renewal past the lease, which would close every session and start the
    /// storm again. Taking over (reading what the last leader left) runs on the main runtime.
    pub async fn run<F, Fut>(
        self: Arc<Self>,
        store: Store,
        cfg: HaConfig,
        cancel: CancellationToken,
        take_over: F,
    ) where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        if !self.replicated() {
            return;
        }
        let main = tokio::runtime::Handle::current();
        let take_over = Arc::new(take_over);
        let (started, on_thread) = tokio::sync::oneshot::channel::<bool>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (me, store2, cfg2, cancel2, t2) = (
            self.clone(),
            store.clone(),
            cfg.clone(),
            cancel.clone(),
            take_over.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("nebula-election".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!("the leader election's runtime: {e}");
                        let _ = started.send(false);
                        return;
                    }
                };
                // Its connections belong to this runtime (opened inside it).
                let opened = {
                    let _in = rt.enter();
                    store2.for_election()
                };
                let store = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("the leader election's connections: {e:#}");
                        let _ = started.send(false);
                        return;
                    }
                };
                let _ = started.send(true);
                rt.block_on(async move {
                    let on_main = move || {
                        let task = main.spawn((*t2)());
                        let abort = AbortOnDrop(task.abort_handle());
                        async move {
                            // The take-over stops if the election stops waiting for it.
                            let _abort = abort;
                            (task.await)
                                .unwrap_or_else(|e| Err(anyhow::anyhow!("taking over: {e}")))
                        }
                    };
                    me.elect(&store, cfg2, cancel2, on_main).await;
                    store.close_election().await;
                });
                let _ = done.send(());
            });
        if spawned.is_err() || !on_thread.await.unwrap_or(false) {
            warn!("the leader election runs on the main runtime (no thread of its own)");
            return self
                .elect(&store, cfg, cancel, move || (*take_over)())
                .await;
        }
        // The heartbeat the election checks before each renewal.
        let mut finished = std::pin::pin!(finished);
        let mut beat = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = &mut finished => return,
                _ = beat.tick() => *lock(&self.main_beat) = Instant::now(),
            }
        }
    }

    /// How long the main runtime has not run the heartbeat, when that is longer than a
    /// busy runtime ever takes ([`STUCK`] or five leases): a leader stuck that way steps
    /// down rather than hold the lease while its tasks and sessions stand still.
    fn main_stuck(&self, cfg: &HaConfig) -> Option<Duration> {
        let silent = lock(&self.main_beat).elapsed();
        (silent > STUCK.max(cfg.lease_ttl * 5)).then_some(silent)
    }

    async fn elect<F, Fut>(
        &self,
        store: &Store,
        cfg: HaConfig,
        cancel: CancellationToken,
        take_over: F,
    ) where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let ttl_ms = i64::try_from(cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let deadline_of = |last_ok: Instant| last_ok + cfg.lease_ttl - cfg.margin();
        let mut listener = None;
        let mut held: Option<(Fence, Instant)> = None;
        // After a failed take-over: no new try (and no reaction to releases) before this.
        let mut quiet_until = Instant::now();
        loop {
            // The leader renews first, and no call waits past its deadline: when the database
            // does not answer in time, it steps down on its own clock.
            if let Some(silent) = self.main_stuck(&cfg) {
                if let Some((fence, _)) = held.take() {
                    warn!(
                        term = fence.term,
                        "the controller has not run its tasks for {} s: stepping down",
                        silent.as_secs()
                    );
                    self.lead(None);
                }
            }
            if let Some((fence, last_ok)) = held.take() {
                let deadline = deadline_of(last_ok);
                let sent = Instant::now();
                let renewed = match deadline.checked_duration_since(sent) {
                    None => Ok(false),
                    Some(left) => tokio::time::timeout(left, store.lease_renew(&fence, ttl_ms))
                        .await
                        .unwrap_or(Ok(false)),
                };
                match renewed {
                    Ok(true) => {
                        self.valid_until(Some(deadline_of(sent)));
                        held = Some((fence, sent));
                    }
                    Ok(false) => {
                        warn!(term = fence.term, "leadership lost: stepping down");
                        self.lead(None);
                    }
                    Err(e) if Instant::now() < deadline => {
                        warn!("renewing the leader lease: {e:#}");
                        held = Some((fence, last_ok));
                    }
                    Err(e) => {
                        warn!(
                            term = fence.term,
                            "leader lease not renewed in time ({e:#}): stepping down"
                        );
                        self.lead(None);
                    }
                }
            }
            // Bookkeeping (the replica list, the listener), bounded the same way.
            let budget = match &held {
                Some((_, ok)) => deadline_of(*ok).saturating_duration_since(Instant::now()),
                None => cfg.lease_ttl,
            };
            let _ = tokio::time::timeout(budget, async {
                if listener.is_none() {
                    listener = store.listen(&[LEADER_CHANNEL]).await.ok();
                }
                if let Err(e) = store.replica_seen(&self.record()).await {
                    warn!("registering this replica: {e:#}");
                }
                self.refresh(store, &cfg).await;
            })
            .await;
            if held.is_none() && Instant::now() >= quiet_until && self.main_stuck(&cfg).is_none() {
                match self.try_to_lead(store, &cfg, ttl_ms, &take_over).await {
                    Ok(Some(h)) => held = Some(h),
                    Ok(None) => {}
                    Err(()) => quiet_until = Instant::now() + cfg.lease_ttl,
                }
            }
            let wait = match &held {
                Some((_, last_ok)) => cfg
                    .renew
                    .min(deadline_of(*last_ok).saturating_duration_since(Instant::now())),
                None => cfg.poll,
            };
            let hear = held.is_none() && Instant::now() >= quiet_until;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                heard = recv(&mut listener), if hear => {
                    if heard.is_none() {
                        // Dropped: reconnect on the next round (and poll meanwhile).
                        listener = None;
                    }
                }
            }
        }
        // Leader tasks stop with the process; the lease is released after they have.
        if held.is_some() {
            self.leading.send_replace(false);
        }
    }

    /// Take the lease when it is free, reload what the old leader changed, renew (the reload
    /// took time), then lead. `Err` after a failed take-over (the lease was given back).
    async fn try_to_lead<F, Fut>(
        &self,
        store: &Store,
        cfg: &HaConfig,
        ttl_ms: i64,
        take_over: &F,
    ) -> Result<Option<(Fence, Instant)>, ()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let sent = Instant::now();
        let term =
            match tokio::time::timeout(cfg.lease_ttl, store.lease_acquire(&self.replica, ttl_ms))
                .await
            {
                Ok(Ok(Some(term))) => term,
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => {
                    warn!("taking the leader lease: {e:#}");
                    return Ok(None);
                }
                Err(_) => return Ok(None),
            };
        let fence = Fence {
            holder: self.replica.clone(),
            term,
        };
        let deadline = sent + cfg.lease_ttl - cfg.margin();
        let failed = match tokio::time::timeout_at(deadline.into(), take_over()).await {
            Ok(Ok(())) => {
                let renewed_at = Instant::now();
                let renewed = match deadline.checked_duration_since(renewed_at) {
                    Some(left) => tokio::time::timeout(left, store.lease_renew(&fence, ttl_ms))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(false),
                    None => false,
                };
                if renewed {
                    info!(term, replica = %self.replica, "elected leader");
                    self.valid_until(Some(renewed_at + cfg.lease_ttl - cfg.margin()));
                    self.lead(Some(term));
                    return Ok(Some((fence, renewed_at)));
                }
                "the lease ran out while taking over".to_owned()
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "taking over took longer than the lease".to_owned(),
        };
        warn!(term, "taking over failed, giving the lease back: {failed}");
        let _ = tokio::time::timeout(cfg.lease_ttl, store.lease_release(&fence)).await;
        Err(())
    }

    /// Give the lease up and leave the replica list (a clean shutdown, after every task
    /// stopped), so that another replica takes over at once.
    pub async fn release(&self, store: &Store) {
        let Some(s) = &self.state else { return };
        let fence = lock(s).take();
        if let Some(f) = fence {
            match store.lease_release(&f).await {
                Ok(true) => info!(term = f.term, "released the leader lease"),
                Ok(false) => {}
                Err(e) => warn!("releasing the leader lease: {e:#}"),
            }
        }
        if let Err(e) = store.replica_gone(&self.replica).await {
            warn!("leaving the replica list: {e:#}");
        }
    }
}

/// A main runtime that has not run a 250 ms heartbeat for this long is stuck, not busy.
const STUCK: Duration = Duration::from_secs(30);

/// Aborts a task when dropped (a take-over the election stopped waiting for).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn recv(listener: &mut Option<crate::store::lease::Listener>) -> Option<()> {
    match listener {
        Some(l) => l.recv().await.ok().flatten().map(|_| ()),
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

impl crate::ControlPlane {
    /// Before a replica leads: read the unfinished jobs, the desired state and the alert
    /// engine's state again (the old leader changed them since this replica loaded them).
    pub(crate) async fn take_over(self: &Arc<Self>) -> anyhow::Result<()> {
        self.jobs.forget_all();
        self.alerts.forget();
        // Sessions start again on this leader, each recording its owner.
        self.store.clear_session_owners().await?;
        let n = self.recover_jobs().await?;
        self.load_desired().await?;
        crate::monitors::load(self).await?;
        info!(
            jobs = n,
            "took over the unfinished jobs, the desired state and the monitors' uptime"
        );
        Ok(())
    }

    /// The HTTP client requests are passed on to the leader with: the public roots and the
    /// fleet CA (a leader serving HTTPS from the fleet CA), no overall timeout (event streams).
    pub fn replica_client(&self) -> reqwest::Client {
        self.ha
            .client
            .get_or_init(|| {
                let mut b = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .redirect(reqwest::redirect::Policy::none());
                if let Ok(ca) = reqwest::Certificate::from_der(self.ca.ca_der()) {
                    b = b.add_root_certificate(ca);
                }
                b.build().unwrap_or_default()
            })
            .clone()
    }

    /// The replicas seen in the last minute and the lease (viewers and up).
    pub async fn replicas(
        &self,
        cx: &crate::authz::OpCtx,
    ) -> Result<nebula_types::api::tasks::ReplicasView, OpError> {
        use nebula_types::api::tasks::{ReplicaView, ReplicasView};
        self.authorize(cx, crate::authz::Op::ReadFleet)?;
        if !self.ha.replicated() {
            let r = self.ha.record();
            return Ok(ReplicasView {
                mode: "single".into(),
                this: r.id.clone(),
                leader: Some(r.id.clone()),
                term: None,
                lease_expires_at: None,
                replicas: vec![view(r, true, self.registry.online_count() as i64)],
            });
        }
        let sessions: std::collections::HashMap<String, i64> = self
            .store
            .sessions_by_replica()
            .await?
            .into_iter()
            .collect();
        let lease = self.store.lease().await?;
        let holder = lease
            .as_ref()
            .filter(|l| !l.holder.is_empty())
            .map(|l| l.holder.clone());
        let replicas = self
            .store
            .replicas(60_000)
            .await?
            .into_iter()
            .map(|r| {
                let leads = holder.as_deref() == Some(r.id.as_str());
                let held = sessions.get(&r.id).copied().unwrap_or(0);
                view(r, leads, held)
            })
            .collect();
        fn view(r: ReplicaRecord, leader: bool, sessions: i64) -> ReplicaView {
            ReplicaView {
                id: r.id,
                hostname: r.hostname,
                http_url: r.http_url,
                quic_addr: r.quic_addr,
                version: r.version,
                started_at: r.started_at,
                seen_at: r.seen_at,
                leader,
                sessions,
            }
        }
        Ok(ReplicasView {
            mode: "replicas".into(),
            this: self.ha.replica.clone(),
            leader: holder,
            term: lease.as_ref().map(|l| l.term),
            lease_expires_at: lease.map(|l| l.expires_at),
            replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_main_runtime_silent_past_the_limit_is_stuck_and_a_busy_one_is_not() {
        let ha = Ha::new(Backend::Postgres);
        let cfg = HaConfig::default();
        // A runtime a few seconds behind (a reconnection storm) is only busy.
        *lock(&ha.main_beat) = Instant::now() - Duration::from_secs(5);
        assert_eq!(ha.main_stuck(&cfg), None);
        // Past 30 s (five default leases) it is stuck.
        *lock(&ha.main_beat) = Instant::now() - Duration::from_secs(31);
        assert!(ha
            .main_stuck(&cfg)
            .is_some_and(|s| s >= Duration::from_secs(31)));
        // A longer lease raises the limit to five leases.
        let long = HaConfig {
            lease_ttl: Duration::from_secs(10),
            ..HaConfig::default()
        };
        assert_eq!(ha.main_stuck(&long), None);
    }
}
