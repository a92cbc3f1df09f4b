//! The evaluator's step on tokio's clock, paused (no sleeps: the runtime jumps to the next
//! timer): evaluations every 15 s from `tokio::time::interval`, times read from
//! `tokio::time::Instant`, the state stored as JSON with what each step sent (a restart reads
//! it back), notifications rendered by the real sink payload.

use std::collections::BTreeMap;
use std::time::Duration;

use nebula_alerts::{AlertState, EngineState, Matcher, Notification, Observation, Silence};

use super::observe::Seen;
use super::rules::catalogue;
use super::{step, AlertsConfig};

const TICK: Duration = Duration::from_secs(15);

fn cfg() -> AlertsConfig {
    AlertsConfig {
        resource_for: Duration::from_secs(120),
        keep_firing_for: Duration::from_secs(120),
        group_wait: Duration::from_secs(30),
        group_interval: Duration::from_secs(300),
        repeat_interval: Duration::from_secs(3600),
        node_unreachable_for: Duration::from_secs(60),
        ..AlertsConfig::default()
    }
}

fn cpu(node: &str, active: bool) -> Observation {
    Observation {
        labels: BTreeMap::from([("node".to_owned(), node.to_owned())]),
        active,
        value: Some(if active { 97.0 } else { 12.0 }),
        summary: format!("CPU on {node}"),
    }
}

/// What one evaluation sees at `secs` into the run.
type Signal = dyn Fn(u64) -> BTreeMap<&'static str, Vec<Observation>>;

struct Run {
    /// (seconds into the run, notification).
    sent: Vec<(u64, Notification)>,
}

impl Run {
    fn firing(&self) -> Vec<u64> {
        self.at(AlertState::Firing)
    }
    fn resolved(&self) -> Vec<u64> {
        self.at(AlertState::Resolved)
    }
    fn at(&self, s: AlertState) -> Vec<u64> {
        self.sent
            .iter()
            .filter(|(_, n)| n.status == s)
            .map(|(t, _)| *t)
            .collect()
    }
}

/// Evaluate every 15 s for `minutes`; at `restart` (seconds), the state is read back from its
/// stored JSON as a new controller would.
async fn run(signal: &Signal, silences: &[Silence], minutes: u64, restart: Option<u64>) -> Run {
    let c = catalogue(&cfg(), &BTreeMap::new());
    let start = tokio::time::Instant::now();
    let base_ms = 1_800_000_000_000_i64;
    let mut ticks = tokio::time::interval(TICK);
    let mut stored = serde_json::to_string(&EngineState::default()).unwrap();
    let mut state = EngineState::default();
    let mut sent = Vec::new();
    loop {
        ticks.tick().await;
        let secs = start.elapsed().as_secs();
        if secs > minutes * 60 {
            break;
        }
        if restart.is_some_and(|r| secs == r) {
            state = serde_json::from_str(&stored).unwrap();
        }
        let now = base_ms + start.elapsed().as_millis() as i64;
        let mut seen = Seen::default();
        for (rule, obs) in signal(secs) {
            seen.by_rule.insert(rule.to_owned(), obs);
        }
        let notes = step(&mut state, &c.rules, &seen, silences, now);
        // Stored with what it sent, in one write (as the evaluator does).
        stored = serde_json::to_string(&state).unwrap();
        for n in notes {
            let sink = crate::store::alerts::SinkRecord {
                name: "s".into(),
                kind: "webhook".into(),
                url: "http://127.0.0.1:9/".into(),
                secret: "whsec_c2VjcmV0".into(),
                min_severity: "info".into(),
                filters: "{}".into(),
                created_by: "t".into(),
                created_at: 0,
            };
            assert!(super::sinks::payload_for(&sink, &n).is_some());
            sent.push((secs, n));
        }
    }
    Run { sent }
}

fn cpu_on_a(active: impl Fn(u64) -> bool + 'static) -> Box<Signal> {
    Box::new(move |t| BTreeMap::from([("cpu_high", vec![cpu("a", active(t))])]))
}

#[test]
fn an_alert_of_a_rule_that_is_gone_resolves_once() {
    let mut c = catalogue(&cfg(), &BTreeMap::new());
    let mut state = EngineState::default();
    let mut seen = Seen::default();
    seen.by_rule.insert("cpu_high".into(), vec![cpu("a", true)]);
    let t0 = 1_800_000_000_000_i64;
    let mut sent = Vec::new();
    for i in 0..40 {
        sent.extend(step(&mut state, &c.rules, &seen, &[], t0 + i * 15_000));
    }
    assert_eq!(sent.len(), 1, "fired: {sent:?}");
    // The rule leaves the catalogue (a rule of the map, removed from it).
    c.rules.remove("cpu_high");
    let mut after = Vec::new();
    // Resolved at the group's next interval (5 min after what it last sent).
    for i in 40..80 {
        after.extend(step(&mut state, &c.rules, &seen, &[], t0 + i * 15_000));
    }
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].status, AlertState::Resolved);
    assert!(
        state.alerts.is_empty()
            || state
                .alerts
                .values()
                .all(|a| a.state == AlertState::Resolved)
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_spike_does_not_fire() {
    let r = run(&*cpu_on_a(|t| (60..150).contains(&t)), &[], 20, None).await;
    assert!(r.sent.is_empty(), "{:?}", r.sent);
}

#[tokio::test(start_paused = true)]
async fn a_sustained_breach_fires_once_repeats_and_resolves_once() {
    // Breached from 1 min to 2 h 10 min.
    let r = run(&*cpu_on_a(|t| (60..7800).contains(&t)), &[], 150, None).await;
    let fired = r.firing();
    // Pending for 2 min, then 30 s group wait: the first at 3.5 min, repeats an hour apart.
    assert_eq!(fired, vec![210, 3810, 7410], "{:?}", r.sent);
    assert!(r
        .sent
        .iter()
        .filter(|(t, _)| *t == 210)
        .all(|(_, n)| !n.repeat));
    assert!(r
        .sent
        .iter()
        .filter(|(t, _)| *t > 210 && *t < 7800)
        .all(|(_, n)| n.repeat));
    // Resolved once: keep_firing_for (2 min) after the last breached evaluation (7785 s),
    // within a group interval.
    let resolved = r.resolved();
    assert_eq!(resolved.len(), 1, "{:?}", r.sent);
    assert!(
        resolved[0] >= 7785 + 120 && resolved[0] <= 7785 + 120 + 300,
        "{resolved:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_flapping_signal_does_not_storm() {
    // Up 30 s, down 30 s, for an hour (after a first sustained breach).
    let flapping =
        |t: u64| (60..300).contains(&t) || (300..3600).contains(&t) && (t / 30).is_multiple_of(2);
    let r = run(&*cpu_on_a(flapping), &[], 70, None).await;
    assert_eq!(r.firing().len(), 1, "one firing notification: {:?}", r.sent);
    assert_eq!(
        r.resolved().len(),
        1,
        "one resolution, when it settles: {:?}",
        r.sent
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_node_inhibits_its_other_alerts() {
    let signal = |t: u64| {
        BTreeMap::from([
            ("cpu_high", vec![cpu("a", t >= 60), cpu("b", t >= 60)]),
            (
                "node_unreachable",
                vec![Observation {
                    labels: BTreeMap::from([("node".to_owned(), "a".to_owned())]),
                    active: t >= 30,
                    value: None,
                    summary: "a is gone".into(),
                }],
            ),
        ])
    };
    let r = run(&signal, &[], 15, None).await;
    let rules: Vec<(String, String)> = r
        .sent
        .iter()
        .filter(|(_, n)| n.status == AlertState::Firing)
        .flat_map(|(_, n)| {
            n.alerts
                .iter()
                .map(|a| (a.rule.clone(), a.labels["node"].clone()))
        })
        .collect();
    assert!(
        rules.contains(&("node_unreachable".into(), "a".into())),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("cpu_high".into(), "b".into())),
        "{rules:?}"
    );
    assert!(
        !rules.contains(&("cpu_high".into(), "a".into())),
        "inhibited: {rules:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silence_mutes_what_it_matches_until_it_ends() {
    let base = 1_800_000_000_000_i64;
    let silence = Silence {
        id: "s".into(),
        matchers: vec![Matcher::parse("node=a").unwrap()],
        starts_at: base,
        ends_at: base + 30 * 60_000,
        created_by: "ana".into(),
        comment: "maintenance".into(),
    };
    let r = run(&*cpu_on_a(|t| t >= 60), &[silence], 40, None).await;
    let fired = r.firing();
    assert!(!fired.is_empty(), "notified once the silence ends");
    assert!(fired[0] >= 30 * 60, "nothing while silenced: {fired:?}");
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_firing_sends_no_duplicate_and_still_resolves() {
    let breach = |t: u64| (60..1800).contains(&t);
    let whole = run(&*cpu_on_a(breach), &[], 40, None).await;
    let restarted = run(&*cpu_on_a(breach), &[], 40, Some(900)).await;
    assert_eq!(
        restarted.firing(),
        whole.firing(),
        "no duplicate after the restart"
    );
    assert_eq!(restarted.firing().len(), 1);
    assert_eq!(
        restarted.resolved(),
        whole.resolved(),
        "the resolution still goes out"
    );
    assert_eq!(restarted.resolved().len(), 1);
}
