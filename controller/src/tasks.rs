//! The background-task driver. Every long-lived task of the controller is registered here with
//! a name, a description and a scope, and runs under its own cancellation token (a child of the
//! controller's shutdown token). Two shapes:
//!
//! - **periodic**: one activation at a time, on a period and whenever its [`Activator`] fires
//!   ("run now"; activations that arrive during a run fold into one more run). Each activation's
//!   start, duration and result (a small JSON summary or an error) are kept.
//! - **service**: a loop that runs until cancelled (the QUIC listener, the HTTP server, the job
//!   writer, the reconciler). A service may report runs through its [`Reporter`].
//!
//! A task's [`Scope`] says where it runs: on every replica, or only while this replica leads.
//! Leader tasks start when leadership is gained and are cancelled (their own token, not the
//! process's) when it is lost. A controller on SQLite is always the leader
//! ([`Leadership::always`]); the HA work plugs its election into [`Leadership`].
//!
//! [`Tasks`] holds every task's status; `GET /api/v1/tasks` and the dashboard show it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use nebula_types::api::tasks::{Kind, LastRun, Scope, State, TaskStatus, Trigger};

/// What a task is, for the registry and the docs.
#[derive(Debug, Clone, Copy)]
pub struct TaskDef {
    pub name: &'static str,
    pub description: &'static str,
    pub scope: Scope,
}

/// Wakes a periodic task now ("run now"). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Activator(Arc<Notify>);

impl Activator {
    pub fn activate(&self) {
        self.0.notify_one();
    }
}

/// Whether this replica leads. A single controller always does.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Always the leader (a controller on SQLite, or one replica alone).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // The receiver keeps the value after the sender is gone.
        drop(tx);
        Self(rx)
    }

    /// Follows an election: `true` while this replica leads.
    pub fn from_watch(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until leadership is `want`; forever when the election is gone and the last word
    /// was the other one.
    async fn until(&mut self, want: bool) {
        loop {
            if *self.0.borrow_and_update() == want {
                return;
            }
            if self.0.changed().await.is_err() {
                if *self.0.borrow() == want {
                    return;
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Every registered task's status.
#[derive(Debug, Clone, Default)]
pub struct Tasks(Arc<Mutex<Vec<TaskStatus>>>);

impl Tasks {
    pub fn list(&self) -> Vec<TaskStatus> {
        self.lock().clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|t| t.name.to_string()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TaskStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, status: TaskStatus) -> Reporter {
        let mut all = self.lock();
        assert!(
            all.iter().all(|t| t.name != status.name),
            "task `{}` registered twice",
            status.name
        );
        all.push(status);
        Reporter {
            tasks: self.clone(),
            index: all.len() - 1,
        }
    }
}

/// Records a task's state and runs in the registry.
#[derive(Debug, Clone)]
pub struct Reporter {
    tasks: Tasks,
    index: usize,
}

impl Reporter {
    fn with(&self, f: impl FnOnce(&mut TaskStatus)) {
        if let Some(t) = self.tasks.lock().get_mut(self.index) {
            f(t);
        }
    }

    fn state(&self, state: State) {
        self.with(|t| t.state = state);
    }

    /// Record one finished run.
    pub fn finished(
        &self,
        started: SystemTime,
        took: Duration,
        trigger: Trigger,
        result: anyhow::Result<serde_json::Value>,
    ) {
        self.record_run(started, took, trigger, result, None);
    }

    /// Record a run and, in the same lock, the state the task is in after it.
    fn record_run(
        &self,
        started: SystemTime,
        took: Duration,
        trigger: Trigger,
        result: anyhow::Result<serde_json::Value>,
        then: Option<State>,
    ) {
        let (ok, result) = match result {
            Ok(v) => (true, v),
            Err(e) => (false, serde_json::Value::String(format!("{e:#}"))),
        };
        self.with(|t| {
            if let Some(state) = then {
                t.state = state;
            }
            t.runs += 1;
            if !ok {
                t.errors += 1;
            }
            t.last = Some(LastRun {
                started_at: nebula_protocol::time::UnixMillis::from_system(started).as_i64(),
                took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                trigger,
                ok,
                result,
            });
        });
    }
}

/// What a task is handed when it starts (again, for leader tasks).
#[derive(Debug, Clone)]
pub struct TaskCx {
    /// This task's own token: cancelled on shutdown and when a leader task loses leadership.
    pub cancel: CancellationToken,
    pub report: Reporter,
}

type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;
type Start = Box<dyn FnMut(TaskCx) -> BoxFut + Send>;

/// Registers tasks, then starts them all under one tracker.
pub struct Driver {
    tasks: Tasks,
    pending: Vec<(TaskDef, Reporter, Start)>,
}

impl Driver {
    pub fn new(tasks: Tasks) -> Self {
        Self {
            tasks,
            pending: Vec::new(),
        }
    }

    /// A loop that runs until its token is cancelled.
    pub fn service<F, Fut>(&mut self, def: TaskDef, mut run: F)
    where
        F: FnMut(TaskCx) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let report = self.register(def, Kind::Service, None);
        self.pending
            .push((def, report, Box::new(move |cx| Box::pin(run(cx)))));
    }

    /// A task activated every `period` and by the returned [`Activator`], one run at a time.
    /// `work` gets the trigger and answers with a summary of what it did. With
    /// `run_at_stop`, one last run happens on the way out (for tasks that buffer in memory).
    pub fn periodic<F, Fut>(
        &mut self,
        def: TaskDef,
        period: Duration,
        run_at_stop: bool,
        work: F,
    ) -> Activator
    where
        F: FnMut(Trigger) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<serde_json::Value>> + Send + 'static,
    {
        self.periodic_with(def, period, Activator::default(), run_at_stop, work)
    }

    /// [`Driver::periodic`] woken by an activator made earlier (one that other parts of the
    /// controller already hold).
    pub fn periodic_with<F, Fut>(
        &mut self,
        def: TaskDef,
        period: Duration,
        activator: Activator,
        run_at_stop: bool,
        work: F,
    ) -> Activator
    where
        F: FnMut(Trigger) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<serde_json::Value>> + Send + 'static,
    {
        let report = self.register(def, Kind::Periodic, Some(period));
        let work = Arc::new(tokio::sync::Mutex::new(work));
        let a = activator.clone();
        let start: Start = Box::new(move |cx| {
            let work = work.clone();
            let a = a.clone();
            Box::pin(async move {
                let mut work = work.lock().await;
                periodic_loop(cx, period, run_at_stop, a, &mut *work).await;
            })
        });
        self.pending.push((def, report, start));
        activator
    }

    fn register(&self, def: TaskDef, kind: Kind, period: Option<Duration>) -> Reporter {
        self.tasks.add(TaskStatus {
            name: def.name.into(),
            description: def.description.into(),
            scope: def.scope,
            kind,
            period_ms: period.map(|p| u64::try_from(p.as_millis()).unwrap_or(u64::MAX)),
            state: State::Starting,
            runs: 0,
            errors: 0,
            last: None,
        })
    }

    /// Start every registered task on `tracker`; each stops when `shutdown` fires.
    pub fn start(self, leadership: Leadership, shutdown: CancellationToken, tracker: &TaskTracker) {
        for (def, report, start) in self.pending {
            let shutdown = shutdown.clone();
            let leadership = leadership.clone();
            tracker.spawn(supervise(def, report, start, leadership, shutdown));
        }
    }
}

/// Runs one task for as long as its scope allows: once for every-replica tasks, once per term
/// of leadership for leader tasks.
async fn supervise(
    def: TaskDef,
    report: Reporter,
    mut start: Start,
    mut leadership: Leadership,
    shutdown: CancellationToken,
) {
    loop {
        if def.scope == Scope::Leader && !leadership.is_leader() {
            report.state(State::WaitingForLeadership);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = leadership.until(true) => {}
            }
        }
        let cancel = shutdown.child_token();
        report.state(State::Idle);
        debug!(task = def.name, "task started");
        let run = start(TaskCx {
            cancel: cancel.clone(),
            report: report.clone(),
        });
        tokio::pin!(run);
        if def.scope == Scope::Leader {
            let mut watching = leadership.clone();
            let ended_by_itself = tokio::select! {
                _ = &mut run => true,
                _ = watching.until(false) => {
                    warn!(task = def.name, "leadership lost: stopping the task");
                    cancel.cancel();
                    run.await;
                    false
                }
            };
            // A leader task that ended by itself (nothing to do) starts again with the next
            // term only.
            if ended_by_itself && !shutdown.is_cancelled() {
                report.state(State::Stopped);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = watching.until(false) => {}
                }
            }
        } else {
            run.await;
        }
        if shutdown.is_cancelled() || def.scope == Scope::EveryReplica {
            break;
        }
    }
    report.state(State::Stopped);
    debug!(task = def.name, "task stopped");
}

async fn periodic_loop<F, Fut>(
    cx: TaskCx,
    period: Duration,
    run_at_stop: bool,
    activator: Activator,
    work: &mut F,
) where
    F: FnMut(Trigger) -> Fut,
    Fut: Future<Output = anyhow::Result<serde_json::Value>>,
{
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        let trigger = tokio::select! {
            _ = cx.cancel.cancelled() => break,
            _ = tick.tick() => if std::mem::take(&mut first) { Trigger::Start } else { Trigger::Period },
            _ = activator.0.notified() => Trigger::Activated,
        };
        run_one(&cx, trigger, work).await;
    }
    if run_at_stop {
        run_one(&cx, Trigger::Stopping, work).await;
    }
}

async fn run_one<F, Fut>(cx: &TaskCx, trigger: Trigger, work: &mut F)
where
    F: FnMut(Trigger) -> Fut,
    Fut: Future<Output = anyhow::Result<serde_json::Value>>,
{
    cx.report.state(State::Running);
    let started = SystemTime::now();
    let t0 = std::time::Instant::now();
    let result = work(trigger).await;
    if let Err(e) = &result {
        warn!("background task run failed: {e:#}");
    }
    cx.report
        .record_run(started, t0.elapsed(), trigger, result, Some(State::Idle));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEF: TaskDef = TaskDef {
        name: "t",
        description: "a test task",
        scope: Scope::EveryReplica,
    };

    async fn eventually(tasks: &Tasks, what: &str, f: impl Fn(&TaskStatus) -> bool) {
        for _ in 0..200 {
            if tasks.list().iter().any(&f) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}: {:?}", tasks.list());
    }

    #[tokio::test]
    async fn a_periodic_task_runs_at_start_on_activation_and_once_more_at_stop() {
        let tasks = Tasks::default();
        let mut d = Driver::new(tasks.clone());
        let n = Arc::new(AtomicUsize::new(0));
        let seen = n.clone();
        let run_now = d.periodic(DEF, Duration::from_secs(3600), true, move |trigger| {
            let k = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if k == 1 {
                    anyhow::bail!("second run fails");
                }
                Ok(serde_json::json!({"run": k, "trigger": trigger}))
            }
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        d.start(Leadership::always(), shutdown.clone(), &tracker);
        eventually(&tasks, "first run", |t| t.runs == 1).await;
        assert_eq!(
            tasks.list()[0].last.as_ref().unwrap().trigger,
            Trigger::Start
        );
        run_now.activate();
        eventually(&tasks, "activated run, failed", |t| {
            t.runs == 2 && t.errors == 1
        })
        .await;
        let last = tasks.list()[0].last.clone().unwrap();
        assert!(!last.ok);
        assert_eq!(last.trigger, Trigger::Activated);
        assert_eq!(last.result, "second run fails");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let t = &tasks.list()[0];
        assert_eq!(t.runs, 3);
        assert_eq!(t.last.as_ref().unwrap().trigger, Trigger::Stopping);
        assert_eq!(t.state, State::Stopped);
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_leader_task_with_nothing_to_do_runs_once_per_term() {
        let tasks = Tasks::default();
        let mut d = Driver::new(tasks.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        let s = starts.clone();
        d.service(
            TaskDef {
                name: "idle-leader",
                description: "ends at once",
                scope: Scope::Leader,
            },
            move |_cx| {
                s.fetch_add(1, Ordering::SeqCst);
                async {}
            },
        );
        let (tx, rx) = watch::channel(true);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        d.start(Leadership::from_watch(rx), shutdown.clone(), &tracker);
        eventually(&tasks, "stopped", |t| t.state == State::Stopped).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "not started again and again"
        );
        tx.send(false).unwrap();
        eventually(&tasks, "waiting", |t| {
            t.state == State::WaitingForLeadership
        })
        .await;
        tx.send(true).unwrap();
        eventually(&tasks, "stopped again", |t| t.state == State::Stopped).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "once more in the next term"
        );
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn a_leader_task_runs_only_while_leading_and_stops_on_its_own_token() {
        let tasks = Tasks::default();
        let mut d = Driver::new(tasks.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        let s = starts.clone();
        d.service(
            TaskDef {
                name: "leader-only",
                description: "runs on the leader",
                scope: Scope::Leader,
            },
            move |cx| {
                s.fetch_add(1, Ordering::SeqCst);
                async move { cx.cancel.cancelled().await }
            },
        );
        let everywhere = Arc::new(AtomicUsize::new(0));
        let e = everywhere.clone();
        d.service(DEF, move |cx| {
            e.fetch_add(1, Ordering::SeqCst);
            async move { cx.cancel.cancelled().await }
        });
        let (tx, rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        d.start(Leadership::from_watch(rx), shutdown.clone(), &tracker);
        eventually(&tasks, "waiting for leadership", |t| {
            t.name == "leader-only" && t.state == State::WaitingForLeadership
        })
        .await;
        eventually(&tasks, "the other one runs", |t| {
            t.name == "t" && t.state == State::Idle
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 0);
        tx.send(true).unwrap();
        eventually(&tasks, "leading", |t| {
            t.name == "leader-only" && t.state == State::Idle
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        tx.send(false).unwrap();
        eventually(&tasks, "lost", |t| {
            t.name == "leader-only" && t.state == State::WaitingForLeadership
        })
        .await;
        tx.send(true).unwrap();
        eventually(&tasks, "leading again", |t| {
            t.name == "leader-only" && t.state == State::Idle
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        // The every-replica task never restarted.
        assert_eq!(everywhere.load(Ordering::SeqCst), 1);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(tasks.list().iter().all(|t| t.state == State::Stopped));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_is_registered_once() {
        let mut d = Driver::new(Tasks::default());
        d.service(DEF, |_| async {});
        d.service(DEF, |_| async {});
    }
}
