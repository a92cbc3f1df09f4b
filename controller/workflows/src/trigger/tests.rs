use super::*;
use serde_json::json;

fn utc_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_millis()
}

fn iso(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn schedule(cron: &str, tz: &str) -> Schedule {
    Schedule {
        cron: cron.into(),
        timezone: tz.into(),
        overlap: Overlap::Skip,
        catch_up: None,
        inputs: Default::default(),
    }
}

/// The times a schedule names from `from`, in UTC.
fn times(t: &Timetable, from: &str, n: usize) -> Vec<String> {
    let mut at = utc_ms(from);
    (0..n)
        .map(|_| {
            at = t.next_after(at).unwrap();
            iso(at)
        })
        .collect()
}

#[test]
fn a_daily_time_in_berlin_across_both_dst_changes() {
    let t = Timetable::new(&schedule("30 2 * * *", "Europe/Berlin")).unwrap();
    // Spring forward on 29 March 2026: 02:30 does not exist that night; it runs at the first
    // minute after the gap (03:00 CEST), once.
    assert_eq!(
        times(&t, "2026-03-27T12:00:00Z", 3),
        vec![
            "2026-03-28T01:30:00Z", // 02:30 CET
            "2026-03-29T01:00:00Z", // 03:00 CEST
            "2026-03-30T00:30:00Z", // 02:30 CEST
        ]
    );
    // Fall back on 25 October 2026: 02:30 happens twice; it runs once, at the first.
    assert_eq!(
        times(&t, "2026-10-23T12:00:00Z", 3),
        vec![
            "2026-10-24T00:30:00Z", // 02:30 CEST
            "2026-10-25T00:30:00Z", // the first 02:30 (CEST)
            "2026-10-26T01:30:00Z", // 02:30 CET
        ]
    );
}

#[test]
fn an_interval_runs_in_each_copy_of_the_repeated_hour() {
    let t = Timetable::new(&schedule("*/30 * * * *", "Europe/Berlin")).unwrap();
    assert_eq!(
        times(&t, "2026-10-24T23:45:00Z", 5),
        vec![
            "2026-10-25T00:00:00Z", // 02:00 CEST
            "2026-10-25T00:30:00Z", // 02:30 CEST
            "2026-10-25T01:00:00Z", // 02:00 CET
            "2026-10-25T01:30:00Z", // 02:30 CET
            "2026-10-25T02:00:00Z", // 03:00 CET
        ]
    );
}

#[test]
fn due_runs_the_latest_missed_time_once_within_the_window() {
    let mut s = schedule("0 * * * *", "UTC");
    let t = Timetable::new(&s).unwrap();
    let since = utc_ms("2026-01-01T10:10:00Z");
    assert_eq!(t.due(since, utc_ms("2026-01-01T10:59:59Z")), None);
    let now = utc_ms("2026-01-01T13:20:00Z");
    let due = t.due(since, now).unwrap();
    assert_eq!(iso(due), "2026-01-01T13:00:00Z", "three missed, one run");
    let tick = Duration::from_secs(1);
    assert!(
        !in_window(&s, due, now, tick),
        "20 minutes late, no catch-up"
    );
    s.catch_up = Some(Duration::from_secs(3600));
    assert!(in_window(&s, due, now, tick));
    assert!(
        in_window(&s, due, due + 2000, tick),
        "a tick late is on time"
    );
}

#[test]
fn bad_schedules_are_refused_with_the_reason() {
    assert!(Timetable::new(&schedule("* * * * * *", "UTC"))
        .unwrap_err()
        .contains("6 fields"));
    assert!(Timetable::new(&schedule("61 * * * *", "UTC")).is_err());
    assert!(Timetable::new(&schedule("0 3 * * *", "Mars/Olympus"))
        .unwrap_err()
        .contains("time zone"));
}

fn headers<'a>(list: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name: &str| {
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

#[test]
fn github_signatures_are_checked() {
    use ring::hmac;
    let body = br#"{"ref":"main"}"#;
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"s3cret");
    let good = format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()));
    let h = [
        ("X-Hub-Signature-256", good.clone()),
        ("X-GitHub-Delivery", "d-1".to_owned()),
    ];
    assert_eq!(
        verify(Scheme::Github, "s3cret", &headers(&h), body, 0),
        Ok(Some(format!("sha256:{}", &good[7..]))),
        "the signature identifies the delivery"
    );
    assert!(verify(Scheme::Github, "other", &headers(&h), body, 0).is_err());
    assert!(verify(
        Scheme::Github,
        "s3cret",
        &headers(&h),
        b"{\"ref\":\"evil\"}",
        0
    )
    .is_err());
    let h = [("X-Hub-Signature-256", "sha1=00".to_owned())];
    assert!(verify(Scheme::Github, "s3cret", &headers(&h), body, 0).is_err());
    assert!(verify(Scheme::Github, "s3cret", &headers(&[]), body, 0).is_err());
}

#[test]
fn gitlab_tokens_and_standard_webhooks_are_checked() {
    let h = [
        ("X-Gitlab-Token", "tok".to_owned()),
        ("X-Gitlab-Event-UUID", "u-1".to_owned()),
    ];
    assert_eq!(
        verify(Scheme::Gitlab, "tok", &headers(&h), b"{}", 0),
        Ok(Some("u-1".into()))
    );
    assert!(verify(Scheme::Gitlab, "tok2", &headers(&h), b"{}", 0).is_err());

    use ring::hmac;
    let raw = b"a key of some length";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let now = 1_800_000_000_000i64;
    let ts = (now / 1000).to_string();
    let body = b"{\"x\":1}";
    let key = hmac::Key::new(hmac::HMAC_SHA256, raw);
    let sig = base64::engine::general_purpose::STANDARD
        .encode(hmac::sign(&key, format!("msg_1.{ts}.{{\"x\":1}}").as_bytes()).as_ref());
    let h = [
        ("webhook-id", "msg_1".to_owned()),
        ("webhook-timestamp", ts.clone()),
        ("webhook-signature", format!("v1,bm90IGl0 v1,{sig}")),
    ];
    assert_eq!(
        verify(Scheme::Standard, &secret, &headers(&h), body, now),
        Ok(Some("msg_1".into()))
    );
    let late = now + 10 * 60 * 1000;
    assert!(verify(Scheme::Standard, &secret, &headers(&h), body, late)
        .unwrap_err()
        .contains("too far"));
    assert!(verify(Scheme::Standard, &secret, &headers(&h), b"{}", now).is_err());
}

#[test]
fn event_conditions_and_trigger_inputs_read_the_trigger() {
    let t = EventTrigger {
        on: EventKind::ContainerChanged,
        cond: Some("trigger.event.state == 'exited' and trigger.event.name == 'db'".into()),
        inputs: serde_json::from_value(json!({"who": "${{ trigger.event.name }}"})).unwrap(),
    };
    let ev = json!({"kind": "container-changed", "event": {"name": "db", "state": "exited"}});
    assert!(matches(&t, &ev).unwrap());
    let other = json!({"kind": "container-changed", "event": {"name": "web", "state": "exited"}});
    assert!(!matches(&t, &other).unwrap());
    assert_eq!(inputs(&t.inputs, &ev).unwrap(), json!({"who": "db"}));
    let bad = Triggers {
        events: vec![EventTrigger {
            cond: Some("steps.x.outputs".into()),
            ..t
        }],
        ..Default::default()
    };
    assert!(
        check(&bad)[0].contains("read `trigger`"),
        "{:?}",
        check(&bad)
    );
}
