//! The behaviours people rely on, step by step on an explicit clock (no sleeps).

use super::*;

const S: i64 = 1000;
const M: i64 = 60 * S;

fn rule(name: &str, for_ms: i64, keep_ms: i64) -> Rule {
    Rule {
        name: name.into(),
        severity: Severity::Warning,
        timing: RuleTiming {
            for_ms,
            keep_firing_for_ms: keep_ms,
            group_wait_ms: 30 * S,
            group_interval_ms: 5 * M,
            repeat_interval_ms: 4 * 60 * M,
        },
        group_by: vec!["node".into()],
        inhibits_by: Vec::new(),
    }
}

fn obs(node: &str, active: bool) -> Observation {
    Observation {
        labels: Labels::from([("node".into(), node.into())]),
        active,
        value: Some(if active { 95.0 } else { 10.0 }),
        summary: format!("cpu on {node}"),
    }
}

/// Run a rule over `until` ms, evaluating every 15 s with `active(t)`, and collect every
/// notification with its time.
struct Sim {
    state: EngineState,
    rules: BTreeMap<String, Rule>,
    silences: Vec<Silence>,
    sent: Vec<Notification>,
    now: i64,
}

impl Sim {
    fn new(rules: Vec<Rule>) -> Sim {
        Sim {
            state: EngineState::default(),
            rules: rules.into_iter().map(|r| (r.name.clone(), r)).collect(),
            silences: Vec::new(),
            sent: Vec::new(),
            now: 0,
        }
    }

    /// One evaluation tick: each rule sees what `seen` says for it.
    fn tick(&mut self, seen: &dyn Fn(&str, i64) -> Vec<Observation>) {
        let rules: Vec<Rule> = self.rules.values().cloned().collect();
        for r in &rules {
            self.state.observe(r, &seen(&r.name, self.now), self.now);
        }
        self.sent
            .extend(self.state.flush(&self.rules, &self.silences, self.now));
    }

    fn run(&mut self, until: i64, seen: &dyn Fn(&str, i64) -> Vec<Observation>) {
        while self.now < until {
            self.tick(seen);
            self.now += 15 * S;
        }
    }

    fn statuses(&self) -> Vec<(AlertState, bool)> {
        self.sent.iter().map(|n| (n.status, n.repeat)).collect()
    }
}

#[test]
fn a_short_spike_does_not_fire() {
    let mut sim = Sim::new(vec![rule("cpu", 5 * M, 0)]);
    sim.run(60 * M, &|_, t| {
        vec![obs("a", (10 * M..12 * M).contains(&t))]
    });
    assert!(sim.sent.is_empty(), "{:?}", sim.sent);
    assert!(sim.state.alerts.is_empty(), "the pending alert is dropped");
}

#[test]
fn a_sustained_breach_fires_once_repeats_at_the_interval_and_resolves_once() {
    let mut sim = Sim::new(vec![rule("cpu", 5 * M, 0)]);
    // Breaching from 0 to 9h, then fine until 10h.
    sim.run(10 * 60 * M, &|_, t| vec![obs("a", t < 9 * 60 * M)]);
    let st = sim.statuses();
    // Fires after `for` (5m) plus group_wait (30s); repeats at 4h and 8h; resolves once.
    assert_eq!(
        st,
        vec![
            (AlertState::Firing, false),
            (AlertState::Firing, true),
            (AlertState::Firing, true),
            (AlertState::Resolved, false),
        ]
    );
    let first = sim.sent[0].at;
    assert!(
        (5 * M + 30 * S..=5 * M + 45 * S).contains(&first),
        "{first}"
    );
    assert!((sim.sent[1].at - first) >= 4 * 60 * M);
    assert!(sim.sent[3].at >= 9 * 60 * M);
    assert_eq!(sim.sent[3].alerts[0].state, AlertState::Resolved);
    assert!(
        sim.state.alerts.is_empty() && sim.state.groups.is_empty(),
        "nothing left over"
    );
}

#[test]
fn keep_firing_for_stops_a_flapping_signal_from_storming() {
    // For an hour: up two minutes, down one, again and again.
    let flap = |_: &str, t: i64| vec![obs("a", t < 60 * M && t % (3 * M) < 2 * M)];
    let mut naive = Sim::new(vec![rule("cpu", 0, 0)]);
    naive.run(2 * 60 * M, &flap);
    let mut kept = Sim::new(vec![rule("cpu", 0, 2 * M)]);
    kept.run(2 * 60 * M, &flap);
    // Without it, every group interval says the opposite of the one before (grouping alone
    // only slows the storm down).
    assert!(naive.sent.len() >= 8, "without it: {:?}", naive.statuses());
    assert_eq!(
        kept.statuses(),
        vec![(AlertState::Firing, false), (AlertState::Resolved, false)],
        "with it: one firing, one resolution"
    );
}

#[test]
fn node_unreachable_inhibits_that_nodes_other_alerts() {
    let mut down = rule("node_unreachable", 0, 0);
    down.inhibits_by = vec!["node".into()];
    let mut sim = Sim::new(vec![down, rule("cpu", 0, 0)]);
    sim.run(10 * M, &|r, _| match r {
        "node_unreachable" => vec![obs("a", true), obs("b", false)],
        _ => vec![obs("a", true), obs("b", true)],
    });
    let groups: Vec<&str> = sim.sent.iter().map(|n| n.group.as_str()).collect();
    assert!(groups.contains(&"node_unreachable{node=a}"), "{groups:?}");
    assert!(
        groups.contains(&"cpu{node=b}"),
        "b is not inhibited: {groups:?}"
    );
    assert!(
        !groups.contains(&"cpu{node=a}"),
        "a's cpu alert is muted: {groups:?}"
    );
    assert!(sim.state.alerts.contains_key("cpu{node=a}"), "but kept");
}

#[test]
fn a_silence_mutes_until_it_ends_then_a_still_firing_alert_is_sent() {
    let mut sim = Sim::new(vec![rule("cpu", 0, 0)]);
    sim.silences.push(Silence {
        id: "s1".into(),
        matchers: vec![
            Matcher::parse("node=a").unwrap(),
            Matcher::parse("alertname=cpu").unwrap(),
        ],
        starts_at: 0,
        ends_at: 20 * M,
        created_by: "ana".into(),
        comment: "maintenance".into(),
    });
    sim.run(30 * M, &|_, _| vec![obs("a", true), obs("b", true)]);
    let a: Vec<i64> = sim
        .sent
        .iter()
        .filter(|n| n.group == "cpu{node=a}")
        .map(|n| n.at)
        .collect();
    assert_eq!(a.len(), 1, "{:?}", sim.sent);
    assert!(a[0] >= 20 * M, "only after the silence: {}", a[0]);
    assert!(sim
        .sent
        .iter()
        .any(|n| n.group == "cpu{node=b}" && n.at < 2 * M));
    assert!(Matcher::parse("node").is_err());
    assert!(Matcher::parse("alertname!=cpu").unwrap().negate);
}

#[test]
fn a_restart_mid_firing_sends_no_duplicate_and_still_sends_the_resolution() {
    let seen = |_: &str, t: i64| vec![obs("a", t < 60 * M)];
    let mut sim = Sim::new(vec![rule("cpu", M, 0)]);
    sim.run(30 * M, &seen);
    assert_eq!(sim.statuses(), vec![(AlertState::Firing, false)]);
    // The controller stores the state after each step and reads it back after a restart.
    let stored = serde_json::to_string(&sim.state).unwrap();
    let mut after = Sim::new(vec![rule("cpu", M, 0)]);
    after.state = serde_json::from_str(&stored).unwrap();
    after.now = sim.now + 2 * M;
    after.run(2 * 60 * M, &seen);
    assert_eq!(
        after.statuses(),
        vec![(AlertState::Resolved, false)],
        "no second firing, and the resolution"
    );
}

#[test]
fn alerts_that_start_together_go_together_and_an_acknowledged_one_is_not_repeated() {
    let mut r = rule("container_down", 0, 0);
    r.group_by = vec!["node".into()];
    let mut sim = Sim::new(vec![r]);
    let two = |_: &str, _: i64| {
        ["web", "db"]
            .into_iter()
            .map(|c| Observation {
                labels: Labels::from([("node".into(), "a".into()), ("container".into(), c.into())]),
                active: true,
                value: None,
                summary: format!("{c} exited"),
            })
            .collect()
    };
    sim.run(M, &two);
    assert_eq!(sim.sent.len(), 1);
    assert_eq!(sim.sent[0].alerts.len(), 2, "one message for both");
    for fp in sim.state.alerts.keys().cloned().collect::<Vec<_>>() {
        assert!(sim.state.acknowledge(&fp, "ana"));
    }
    sim.run(10 * 60 * M, &two);
    assert_eq!(sim.sent.len(), 1, "acknowledged: not repeated");
}

#[test]
fn an_instance_out_of_view_keeps_its_state() {
    let r = rule("container_down", 0, 0);
    let rules: BTreeMap<String, Rule> = [(r.name.clone(), r.clone())].into();
    let mut state = EngineState::default();
    state.observe(&r, &[obs("a", true)], 0);
    assert!(state.flush(&rules, &[], 0).is_empty(), "group_wait first");
    assert_eq!(state.flush(&rules, &[], 60 * S).len(), 1);
    // Node a's figures are not in (a restart, or it is offline): nothing is listed for it.
    for t in 1..10 {
        state.observe_where(&r, &[], 60 * S + t * 15 * S, |l| {
            l.get("node").map(String::as_str) != Some("a")
        });
        assert!(state.flush(&rules, &[], 60 * S + t * 15 * S).is_empty());
    }
    assert_eq!(
        state.alerts["container_down{node=a}"].state,
        AlertState::Firing
    );
    // In view again and still down: no new notification; when it comes back, one resolution.
    state.observe(&r, &[obs("a", true)], 10 * M);
    assert!(state.flush(&rules, &[], 10 * M).is_empty());
    state.observe(&r, &[obs("a", false)], 11 * M);
    let sent = state.flush(&rules, &[], 11 * M);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, AlertState::Resolved);
}
