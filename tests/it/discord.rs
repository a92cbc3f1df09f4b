//! The Discord bot, end to end: a `nebula serve` with a bot token runs the real serenity client,
//! which connects to `common::fake_discord` (a stand-in on 127.0.0.1 that speaks Discord's REST
//! and gateway wire formats, since Discord is not reachable here), receives interactions and
//! messages through the gateway and answers over REST.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::fake_discord::{buttons, content, names, Call, FakeDiscord};
use crate::common::{self, join_ready, wait_for, Controller, ControllerOpts};

const GUILD: u64 = 700_000_000_000_000_001;
const GUILD_S: &str = "700000000000000001";
const OTHER_GUILD: u64 = 700_000_000_000_000_002;
const VIEWERS: u64 = 111;
const OPERATORS: u64 = 222;

/// Alerts evaluated, grouped and resolved at once (a node unreachable for a second fires).
const FAST_ALERTS: [&str; 10] = [
    "--alert-interval",
    "300ms",
    "--alert-group-wait",
    "0s",
    "--alert-group-interval",
    "1s",
    "--alert-node-unreachable-for",
    "1s",
    "--alert-keep-firing-for",
    "0s",
];

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A controller whose bot talks to `fake`, confirmations valid `confirm`; more flags in `extra`.
async fn controller(
    fake: &FakeDiscord,
    confirm: &str,
    extra: &[&'static str],
) -> (Controller, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("discord.token");
    std::fs::write(&token, "fake-bot-token\n").unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(
        &path,
        format!(
            "[discord]\ntoken_file = \"{}\"\napi_url = \"{}\"\nconfirm_timeout = \"{confirm}\"\n",
            token.display(),
            fake.url()
        ),
    )
    .unwrap();
    let mut flags = vec!["--config", leak(path.display().to_string())];
    flags.extend_from_slice(extra);
    let c = Controller::start(ControllerOpts {
        extra: flags,
        ..ControllerOpts::default()
    })
    .await;
    (c, dir)
}

/// Replace a server's settings as a Nebula admin, with `nebula discord set` (the API's PUT).
async fn settings(c: &Controller, guild: u64, s: Value) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), s.to_string()).unwrap();
    let out = c.cli(&[
        "discord",
        "set",
        &guild.to_string(),
        &file.path().display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["discord", "show", &guild.to_string()]);
    let shown: Value = serde_json::from_slice(&out.stdout).expect("settings as JSON");
    assert!(holds(&shown, &s), "stored {shown}, sent {s}");
}

/// Does `big` hold every value of `small` (objects compared key by key, defaults ignored)?
fn holds(big: &Value, small: &Value) -> bool {
    match (big, small) {
        (Value::Object(b), Value::Object(s)) => s
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|bv| holds(bv, v))),
        _ => big == small,
    }
}

/// The answer to interaction `id`: its callback.
async fn callback(fake: &FakeDiscord, id: u64) -> Call {
    fake.wait_call(&format!("the answer to interaction {id}"), 0, |c| {
        c.method == "POST" && c.path.contains(&format!("/interactions/{id}/"))
    })
    .await
}

/// The next edit of an interaction's first message whose text holds `text`.
async fn edited(fake: &FakeDiscord, token: &str, text: &str) -> Call {
    fake.wait_call(&format!("an edit of {token} saying `{text}`"), 0, |c| {
        c.method == "PATCH"
            && c.path.contains(&format!("/{token}/messages/@original"))
            && content(c).contains(text)
    })
    .await
}

fn ephemeral(c: &Call) -> bool {
    c.body["data"]["flags"].as_u64().unwrap_or(0) & 64 != 0
}

/// The confirmation id offered by a deferred destructive command.
async fn confirmation(fake: &FakeDiscord, token: &str) -> String {
    let ask = edited(fake, token, "Confirm").await;
    buttons(&ask)
        .into_iter()
        .find_map(|b| b.strip_prefix("nebula:confirm:").map(str::to_owned))
        .expect("a Confirm button")
}

async fn audit(c: &Controller, action: &str) -> Vec<Value> {
    let page = c
        .get(&format!("/api/v1/audit?via=discord&action={action}"))
        .await;
    page["items"].as_array().cloned().unwrap_or_default()
}

/// [`audit`] once it has a row (audit rows are written by the job writer, a batch later).
async fn audit_rows(c: &Controller, action: &str) -> Vec<Value> {
    wait_for(
        &format!("an audit row for {action}"),
        Duration::from_secs(10),
        || async {
            let rows = audit(c, action).await;
            (!rows.is_empty()).then_some(rows)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_roles_links_and_confirmations_and_are_audited() {
    let fake = FakeDiscord::start(&[GUILD]).await;
    let (c, _dir) = controller(&fake, "3s", &[]).await;
    let first = fake.wait_ready(GUILD).await;
    for cmd in ["fleet", "node", "deploy", "run", "ask", "link", "settings"] {
        assert!(first.contains(&cmd.to_owned()), "{cmd} in {first:?}");
    }
    let out = c.cli(&["discord", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("connected as nebula#") && text.contains(GUILD_S),
        "{text}"
    );
    let status = c.get("/api/v1/discord").await;
    assert_eq!(status["bot"]["connected"], true, "{status}");
    assert!(status["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["id"] == GUILD_S));
    settings(
        &c,
        GUILD,
        json!({ "roles": { VIEWERS.to_string(): "viewer", OPERATORS.to_string(): "operator" } }),
    )
    .await;

    // No link and no mapped role: refused, told how to link.
    let (id, _) = fake.command(GUILD, 5, &[], "fleet", &[]);
    let answer = callback(&fake, id).await;
    assert!(content(&answer).contains("/link"), "{answer:?}");
    assert!(ephemeral(&answer));

    // A viewer reads the fleet but may not deploy.
    let (id, _) = fake.command(GUILD, 6, &[VIEWERS], "fleet", &[]);
    let answer = callback(&fake, id).await;
    assert!(content(&answer).contains("**Fleet**"), "{answer:?}");
    let (id, _) = fake.command(GUILD, 6, &[VIEWERS], "deploy", &[]);
    let answer = callback(&fake, id).await;
    assert!(content(&answer).contains("Refused"), "{answer:?}");
    assert!(content(&answer).contains("Operator"), "{answer:?}");
    assert!(ephemeral(&answer));

    // An operator's deploy is deferred, then waits for the same user's click.
    let (id, token) = fake.command(GUILD, 7, &[OPERATORS], "deploy", &[]);
    let deferred = callback(&fake, id).await;
    assert_eq!(deferred.body["type"], 5, "deferred: {deferred:?}");
    assert!(ephemeral(&deferred));
    let confirm = confirmation(&fake, &token).await;
    let (other, _) = fake.click(
        GUILD,
        8,
        &[OPERATORS],
        &format!("nebula:confirm:{confirm}"),
        1,
    );
    let refused = callback(&fake, other).await;
    assert!(
        content(&refused).contains("Only the person who asked"),
        "{refused:?}"
    );
    assert!(
        audit(&c, "map.reconcile").await.is_empty(),
        "nothing ran on another user's click"
    );
    let (click, click_token) = fake.click(
        GUILD,
        7,
        &[OPERATORS],
        &format!("nebula:confirm:{confirm}"),
        1,
    );
    let running = callback(&fake, click).await;
    assert_eq!(
        running.body["type"], 7,
        "the confirmation message is updated: {running:?}"
    );
    edited(&fake, &click_token, "reconciler").await;
    let rows = wait_for("the reconcile's audit row", Duration::from_secs(10), || {
        let c = &c;
        async move {
            let rows = audit(c, "map.reconcile").await;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor"], "discord:user7");
    assert_eq!(rows[0]["detail"]["via"], "discord");
    assert_eq!(rows[0]["detail"]["discord"]["user"], "7");
    assert_eq!(rows[0]["detail"]["discord"]["guild"], GUILD.to_string());
    let out = c.cli(&["audit", "--via", "discord", "--action", "map.reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("discord:user7") && text.contains("discord"),
        "{text}"
    );

    // A confirmation answered after its time runs nothing.
    let (_, token) = fake.command(GUILD, 7, &[OPERATORS], "deploy", &[]);
    let confirm = confirmation(&fake, &token).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let (late, _) = fake.click(
        GUILD,
        7,
        &[OPERATORS],
        &format!("nebula:confirm:{confirm}"),
        2,
    );
    let expired = callback(&fake, late).await;
    assert!(content(&expired).contains("Expired"), "{expired:?}");
    assert_eq!(audit(&c, "map.reconcile").await.len(), 1);

    // A linked account acts as its Nebula user: here an operator who runs a command on a node,
    // its output streamed by edits.
    let (code, _) = c
        .api(
            Method::POST,
            "/api/v1/users",
            Some(json!({ "username": "alice", "password": "correct horse battery", "role": "operator" })),
        )
        .await;
    assert_eq!(code, 201);
    // The code from the CLI, as a person would get it.
    let out = c.cli(&["user", "link-discord", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = stdout
        .lines()
        .find_map(|l| l.strip_prefix("/link "))
        .expect("a /link line")
        .to_owned();
    let link = json!({ "code": code });
    let (id, _) = fake.command(
        GUILD,
        9,
        &[],
        "link",
        &[("code", link["code"].as_str().unwrap())],
    );
    assert!(content(&callback(&fake, id).await).contains("`alice`"));
    let (id, _) = fake.command(
        GUILD,
        10,
        &[],
        "link",
        &[("code", link["code"].as_str().unwrap())],
    );
    assert!(
        content(&callback(&fake, id).await).contains("unknown, used or expired"),
        "a code links once"
    );
    let dir = tempfile::tempdir().unwrap();
    let agent_cfg = "[exec.commands.count]\nargv = [\"sh\", \"-c\", \"for i in 1 2 3; do echo tick-$i; sleep 1; done\"]\n";
    let (_agent, _) = join_ready(&c, dir.path(), "box", &[], Some(agent_cfg)).await;
    let (id, token) = fake.command(
        GUILD,
        9,
        &[],
        "run",
        &[("node", "box"), ("operation", "count")],
    );
    assert_eq!(callback(&fake, id).await.body["type"], 5);
    let confirm = confirmation(&fake, &token).await;
    let (_, click_token) = fake.click(GUILD, 9, &[], &format!("nebula:confirm:{confirm}"), 3);
    edited(&fake, &click_token, "tick-1").await;
    let done = edited(&fake, &click_token, "✅ done").await;
    assert!(content(&done).contains("tick-3"), "{done:?}");
    let edits = fake
        .calls()
        .iter()
        .filter(|c| {
            c.method == "PATCH"
                && c.path
                    .contains(&format!("/{click_token}/messages/@original"))
        })
        .count();
    assert!(edits >= 3, "the output came in {edits} edits");
    let runs = wait_for("the job's audit row", Duration::from_secs(10), || {
        let c = &c;
        async move {
            let rows = audit(c, "job.create").await;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(runs[0]["actor"], "alice");
    assert_eq!(runs[0]["detail"]["discord"]["user"], "9");
    // Reads as the linked operator: a node's figures, recent jobs, names offered as typed.
    let (id, _) = fake.command(GUILD, 9, &[], "node", &[("node", "box")]);
    let node = content(&callback(&fake, id).await);
    assert!(node.contains("**box**") && node.contains("CPU"), "{node}");
    let (id, _) = fake.command(GUILD, 9, &[], "jobs", &[]);
    let jobs = content(&callback(&fake, id).await);
    assert!(
        jobs.contains("count") && jobs.contains("by alice"),
        "{jobs}"
    );
    let (id, _) = fake.command(GUILD, 9, &[], "services", &[]);
    assert!(content(&callback(&fake, id).await).contains("No services"));
    let id = fake.autocomplete(GUILD, 9, &[], "node", "node", "bo");
    let offered = callback(&fake, id).await;
    assert_eq!(offered.body["type"], 8, "{offered:?}");
    assert_eq!(offered.body["data"]["choices"][0]["value"], "box");
    // Someone with no role is offered nothing.
    let id = fake.autocomplete(GUILD, 5, &[], "node", "node", "bo");
    let offered = callback(&fake, id).await;
    assert_eq!(offered.body["data"]["choices"], json!([]), "{offered:?}");
    let links = c.get("/api/v1/discord/links").await;
    assert_eq!(links[0]["user"], "alice", "{links}");
    assert_eq!(links[0]["discord_user"], "9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_toggle_commands_greet_members_and_moderate_messages() {
    let fake = FakeDiscord::start(&[GUILD, OTHER_GUILD]).await;
    let (c, _dir) = controller(&fake, "2m", &[]).await;
    fake.wait_ready(GUILD).await;
    fake.wait_ready(OTHER_GUILD).await;
    // A server admin (Manage Server) changes settings with /settings; no Nebula role needed.
    let admin_perms = "32";
    let set = |key: &'static str, value: &'static str| {
        let (id, _) = fake.command_with(
            GUILD,
            20,
            &[],
            "settings",
            &[("key", key), ("value", value)],
            admin_perms,
        );
        id
    };
    let before = fake.calls().len();
    let id = set("group", "ai off");
    assert!(content(&callback(&fake, id).await).contains("changed"));
    let again = fake
        .wait_call("the server's commands registered again", before, |c| {
            c.method == "PUT" && c.path.ends_with(&format!("/guilds/{GUILD}/commands"))
        })
        .await;
    let now = names(&again.body);
    assert!(
        !now.contains(&"ask".to_owned()) && now.contains(&"fleet".to_owned()),
        "{now:?}"
    );
    let other = fake
        .calls()
        .into_iter()
        .rfind(|c| {
            c.method == "PUT" && c.path.ends_with(&format!("/guilds/{OTHER_GUILD}/commands"))
        })
        .unwrap();
    assert!(
        names(&other.body).contains(&"ask".to_owned()),
        "the other server keeps /ask"
    );
    // Added to a third server while connected: its commands are registered, its name kept.
    fake.add_guild(700_000_000_000_000_003, "Homelab Friends");
    fake.wait_ready(700_000_000_000_000_003).await;
    let out = c.cli(&["discord", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("Homelab Friends"), "{text}");
    let (id, _) = fake.command(GUILD, 21, &[], "ask", &[("prompt", "hi")]);
    assert!(content(&callback(&fake, id).await).contains("switched off"));
    // A member without Manage Server may not change settings, and a server admin may not
    // grant Nebula roles.
    let (id, _) = fake.command(
        GUILD,
        21,
        &[],
        "settings",
        &[("key", "nickname"), ("value", "x")],
    );
    assert!(content(&callback(&fake, id).await).contains("Manage Server"));
    let stored = c.get("/api/v1/discord").await;
    let g = stored["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == GUILD_S)
        .unwrap()
        .clone();
    assert_eq!(g["settings"]["groups"]["ai"], false);
    assert_eq!(g["settings"]["nickname"], "");

    for (key, value) in [
        ("welcome", "<#66> Welcome {user} to {server}!"),
        ("moderation", "api_key=delete"),
        ("log", "<#77>"),
    ] {
        let id = set(key, value);
        assert!(
            content(&callback(&fake, id).await).contains("changed"),
            "{key}"
        );
    }
    fake.join(GUILD, 12, "newbie");
    let welcome = fake
        .wait_call("the welcome message", 0, |c| {
            c.method == "POST" && c.path.ends_with("/channels/66/messages")
        })
        .await;
    assert!(content(&welcome).contains("Welcome <@12>"), "{welcome:?}");

    let id = set("goodbye", "<#66> {name} left {server}.");
    assert!(content(&callback(&fake, id).await).contains("changed"));
    fake.leave(GUILD, 14, "leaver");
    let bye = fake
        .wait_call("the goodbye message", 0, |c| {
            c.method == "POST"
                && c.path.ends_with("/channels/66/messages")
                && content(c).contains("leaver left")
        })
        .await;
    assert!(!content(&bye).contains("{server}"), "{bye:?}");

    // Self-assigned roles (set by a Nebula admin here, with the CLI): a button per role, a
    // click adds it, a click by someone who has it removes it; roles not offered are refused.
    settings(
        &c,
        GUILD,
        json!({ "groups": { "fleet": true, "ai": false, "community": true },
        "self_roles": [{ "role": "333", "label": "Gamer" }] }),
    )
    .await;
    let (id, _) = fake.command(GUILD, 15, &[], "roles", &[]);
    let offer = callback(&fake, id).await;
    assert_eq!(buttons(&offer), ["nebula:role:333"]);
    let (id, _) = fake.click(GUILD, 15, &[], "nebula:role:333", 9);
    assert!(content(&callback(&fake, id).await).contains("You have"));
    assert!(fake
        .calls()
        .iter()
        .any(|c| c.method == "PUT" && c.path.ends_with("/members/15/roles/333")));
    let (id, _) = fake.click(GUILD, 15, &[333], "nebula:role:333", 9);
    assert!(content(&callback(&fake, id).await).contains("Removed"));
    assert!(fake
        .calls()
        .iter()
        .any(|c| c.method == "DELETE" && c.path.ends_with("/members/15/roles/333")));
    let (id, _) = fake.click(GUILD, 15, &[], "nebula:role:444", 9);
    assert!(content(&callback(&fake, id).await).contains("not offered"));

    // Commands answer only in the channels listed (the stand-in's interactions come from 1).
    let id = set("channels", "<#5>");
    assert!(
        content(&callback(&fake, id).await).contains("changed"),
        "/settings still answers"
    );
    let (id, _) = fake.command(GUILD, 15, &[], "roles", &[]);
    assert!(content(&callback(&fake, id).await).contains("I answer in <#5>"));
    let id = set("channels", "");
    assert!(content(&callback(&fake, id).await).contains("changed"));

    for (key, value) in [
        ("moderation", "api_key=delete"),
        ("log", "<#77>"),
        ("welcome", "<#66> Welcome {user} to {server}!"),
    ] {
        let id = set(key, value);
        assert!(
            content(&callback(&fake, id).await).contains("changed"),
            "{key}"
        );
    }
    let clean = fake.say(GUILD, 5, 13, "hello everyone");
    let leaked = fake.say(
        GUILD,
        5,
        13,
        "my key is sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
    );
    let deleted = fake
        .wait_call("the message with a key deleted", 0, |c| {
            c.method == "DELETE" && c.path.contains("/messages/")
        })
        .await;
    assert!(
        deleted
            .path
            .ends_with(&format!("/channels/5/messages/{leaked}")),
        "{deleted:?}"
    );
    let log = fake
        .wait_call("the moderators' log", 0, |c| {
            c.method == "POST" && c.path.ends_with("/channels/77/messages")
        })
        .await;
    assert!(
        content(&log).contains("deleted") && content(&log).contains("api_key"),
        "{log:?}"
    );
    assert!(
        !content(&log).contains("abcdefghijklmnopqrstuvwxyz"),
        "the log masks the key"
    );
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.method == "DELETE" && c.path.ends_with(&format!("/{clean}"))),
        "a clean message stays"
    );
    let rows = audit_rows(&c, "discord.moderation").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_post_with_buttons_that_work_after_a_restart_and_resolve_in_place() {
    let fake = FakeDiscord::start(&[GUILD]).await;
    let (mut c, _dir) = controller(&fake, "2m", &FAST_ALERTS).await;
    fake.wait_ready(GUILD).await;
    settings(
        &c,
        GUILD,
        json!({
            "roles": { OPERATORS.to_string(): "operator" },
            "alerts": { "channel": "55", "filters": { "rules": ["node_unreachable"] } },
        }),
    )
    .await;
    let sinks = c.get("/api/v1/alerts/sinks").await;
    assert!(
        sinks
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "discord-bot"),
        "{sinks}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _) = join_ready(&c, dir.path(), "flaky", &[], None).await;
    agent.proc.kill();
    let (posted, ack) = unreachable_posted(&fake).await;
    assert!(buttons(&posted)
        .iter()
        .any(|b| b.starts_with("nebula:silence:")));
    let fingerprint = ack.trim_start_matches("nebula:ack:").to_owned();

    // The controller restarts; the button still works.
    let identified = fake.identifies();
    c.restart_hard().await;
    wait_for("the bot to connect again", Duration::from_secs(30), || {
        let n = fake.identifies();
        async move { (n > identified).then_some(()) }
    })
    .await;
    wait_for(
        "the alert to fire again after the restart",
        Duration::from_secs(20),
        || {
            let c = &c;
            let fp = fingerprint.clone();
            async move {
                let a = c.get("/api/v1/alerts").await;
                a.as_array()?
                    .iter()
                    .any(|a| a["fingerprint"] == fp.as_str() && a["state"] == "firing")
                    .then_some(())
            }
        },
    )
    .await;
    // A viewer's click is refused; an operator's acknowledges.
    let (id, _) = fake.click(GUILD, 30, &[], &ack, 1);
    assert!(content(&callback(&fake, id).await).contains("Refused"));
    let (id, _) = fake.click(GUILD, 31, &[OPERATORS], &ack, 1);
    let answer = callback(&fake, id).await;
    assert!(content(&answer).contains("Acknowledged"), "{answer:?}");
    let alerts = c.get("/api/v1/alerts").await;
    let a = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["fingerprint"] == fingerprint.as_str())
        .unwrap()
        .clone();
    assert_eq!(a["acknowledged_by"], "discord:user31", "{a}");
    let rows = audit_rows(&c, "alert.acknowledge").await;
    assert_eq!(rows[0]["detail"]["discord"]["user"], "31");

    // The node comes back: the resolution edits the message it was posted as.
    let message = posted_id(&posted);
    let _agent = common::Agent::run(&dir.path().join("flaky"));
    let resolved = fake
        .wait_call("the alert message edited as resolved", 0, |c| {
            c.method == "PATCH"
                && c.path
                    .ends_with(&format!("/channels/55/messages/{message}"))
                && content(c).contains("resolved")
        })
        .await;
    assert!(
        buttons(&resolved).is_empty(),
        "a resolved alert has no buttons"
    );
}

/// The `node_unreachable` alert posted in channel 55, and its Acknowledge button's id.
async fn unreachable_posted(fake: &FakeDiscord) -> (Call, String) {
    let posted = fake
        .wait_call("the alert posted", 0, |c| {
            c.method == "POST" && c.path.ends_with("/channels/55/messages")
        })
        .await;
    assert!(content(&posted).contains("node_unreachable"), "{posted:?}");
    let ack = buttons(&posted)
        .into_iter()
        .find(|b| b.starts_with("nebula:ack:"))
        .expect("an Acknowledge button");
    (posted, ack)
}

/// The id the stand-in gave a posted message.
fn posted_id(posted: &Call) -> String {
    posted.response["id"]
        .as_str()
        .expect("a message id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_resumes_after_a_drop_without_running_anything_twice() {
    let fake = FakeDiscord::start(&[GUILD]).await;
    let (c, _dir) = controller(&fake, "2m", &[]).await;
    fake.wait_ready(GUILD).await;
    settings(&c, GUILD, json!({ "everyone": "operator" })).await;
    let (id, _) = fake.command(
        GUILD,
        40,
        &[],
        "silence",
        &[("match", "node=a"), ("for", "1h")],
    );
    assert!(content(&callback(&fake, id).await).contains("Silenced"));
    // The connection drops; Discord sends the last dispatch again on RESUME.
    fake.redeliver_on_resume(1);
    fake.drop_connection();
    wait_for("the bot to resume", Duration::from_secs(30), || {
        let n = fake.resumes();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let (id2, _) = fake.command(
        GUILD,
        40,
        &[],
        "silence",
        &[("match", "node=b"), ("for", "1h")],
    );
    assert!(content(&callback(&fake, id2).await).contains("Silenced"));
    assert_eq!(fake.identifies(), 1, "resumed, not identified again");
    let answers = fake
        .calls()
        .iter()
        .filter(|c| c.path.contains(&format!("/interactions/{id}/")))
        .count();
    assert_eq!(answers, 1, "the redelivered interaction ran once");
    let silences = c.get("/api/v1/alerts/silences").await;
    assert_eq!(silences.as_array().unwrap().len(), 2, "{silences}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_answers_through_llama_cpp_with_the_servers_persona_and_imagine_posts_an_image() {
    use crate::common::fake_ollama::FakeSd;
    let (_llama, llama_url) = crate::ai::llama_server("smol").await;
    let sd = FakeSd::start(&["sdxl_base"], "sdxl_base").await;
    let fake = FakeDiscord::start(&[GUILD]).await;
    let (c, _dir) = controller(&fake, "2m", &[]).await;
    fake.wait_ready(GUILD).await;
    let dir = tempfile::tempdir().unwrap();
    let _a = crate::ai::agent(&c, dir.path(), "llm-node", "openai", &llama_url).await;
    let _b = crate::ai::agent(&c, dir.path(), "art-node", "sd-webui", &sd.url()).await;
    crate::ai::wait_model(&c, "smol", &["llm-node"]).await;
    crate::ai::wait_model(&c, "sdxl_base", &["art-node"]).await;
    let limits = json!({ "cooldown_s": 0, "per_hour": 100 });
    settings(
        &c,
        GUILD,
        json!({ "everyone": "operator", "ai_limits": limits }),
    )
    .await;

    // The prompt's size shows which persona went to the model: the default one, then the
    // server's own (a long one).
    let tokens = |call: &Call| -> u64 {
        let text = content(call);
        let tail = text.rsplit("· ").next().unwrap_or("");
        tail.trim_end_matches(" prompt tokens").parse().unwrap_or(0)
    };
    let (id, token) = fake.command(GUILD, 50, &[], "ask", &[("prompt", "Say hello.")]);
    assert_eq!(callback(&fake, id).await.body["type"], 5, "deferred");
    let plain = edited(&fake, &token, "prompt tokens").await;
    assert!(content(&plain).contains("-# smol"), "{plain:?}");
    let persona =
        "You are Captain Nebula, keeper of the homelab, and you answer as a ship's captain would. "
            .repeat(12);
    settings(
        &c,
        GUILD,
        json!({ "everyone": "operator", "ai_limits": limits, "persona": { "system": persona, "model": "smol" } }),
    )
    .await;
    let (_, token) = fake.command(GUILD, 50, &[], "ask", &[("prompt", "Say hello.")]);
    let captain = edited(&fake, &token, "prompt tokens").await;
    assert!(
        tokens(&captain) > tokens(&plain) + 150,
        "the persona reached the model: {} then {} prompt tokens",
        tokens(&plain),
        tokens(&captain)
    );
    let usage = c.get("/api/v1/ai/usage").await;
    assert!(
        usage.to_string().contains("discord:"),
        "accounted to the Discord caller: {usage}"
    );

    let (_, token) = fake.command(GUILD, 50, &[], "imagine", &[("prompt", "a red fox")]);
    let image = fake
        .wait_call("the image", 0, |call| {
            call.method == "PATCH" && call.path.contains(&token) && !call.files.is_empty()
        })
        .await;
    assert!(
        image.files[0].1.starts_with(b"\x89PNG"),
        "a PNG: {:?}",
        image.files[0].0
    );
    assert!(content(&image).contains("art-node"), "{image:?}");
    assert_eq!(sd.requests.lock().unwrap()[0]["prompt"], "a red fox");

    // The server's cooldown holds a member back.
    let limits = json!({ "cooldown_s": 60, "per_hour": 100 });
    settings(
        &c,
        GUILD,
        json!({ "everyone": "operator", "ai_limits": limits }),
    )
    .await;
    let (id, _) = fake.command(GUILD, 51, &[], "ask", &[("prompt", "one")]);
    assert_eq!(callback(&fake, id).await.body["type"], 5);
    let (id, _) = fake.command(GUILD, 51, &[], "ask", &[("prompt", "two")]);
    assert!(content(&callback(&fake, id).await).contains("Slow down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_connects_the_bot_links_an_account_and_edits_a_server() {
    use crate::dashboard_http::{client, first_admin_password, session_pair, sign_in};
    let fake = FakeDiscord::start(&[GUILD]).await;
    // No token in the config: the dashboard gives it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(&path, format!("[discord]\napi_url = \"{}\"\n", fake.url())).unwrap();
    let c = Controller::start(ControllerOpts {
        extra: vec!["--config", leak(path.display().to_string())],
        ..ControllerOpts::default()
    })
    .await;
    assert_eq!(c.get("/api/v1/discord").await["bot"]["configured"], false);
    let password = first_admin_password(&c).await;
    let cookie = session_pair(&sign_in(&c, "admin", &password, false).await.unwrap());
    let http = client();
    let get = |path: &'static str| {
        let (http, cookie, url) = (http.clone(), cookie.clone(), c.url(path));
        async move {
            let r = http.get(url).header("cookie", cookie).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let post = |path: String, form: Vec<(String, String)>| {
        let (http, cookie, url) = (http.clone(), cookie.clone(), c.url(&path));
        async move {
            http.post(url)
                .header("cookie", cookie)
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    let page = get("/ui/discord").await;
    assert!(
        page.contains("no token") && page.contains("token-form"),
        "{page}"
    );
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut v = vec![("csrf".to_owned(), csrf.clone())];
        v.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    };

    // Connect: the token is stored and the bot connects at once.
    let r = post(
        "/ui/discord/token".into(),
        f(&[("token", "fake-bot-token-0123456789abcdef")]),
    )
    .await;
    assert_eq!(r.status(), 303);
    fake.wait_ready(GUILD).await;
    // Kept as a fleet secret, sealed in the database (whichever replica leads has it), not
    // as a file of this controller's.
    assert!(!c.dir.path().join("data").join("discord.token").exists());
    let secrets = c.get("/api/v1/secrets").await;
    assert!(
        secrets.to_string().contains("nebula.discord-token")
            && !secrets.to_string().contains("fake-bot-token"),
        "{secrets}"
    );
    let page = get("/ui/discord").await;
    assert!(
        page.contains("connected") && page.contains(&format!("guild-{GUILD_S}")),
        "{page}"
    );
    assert!(
        page.contains("client_id=900000000000000001"),
        "the invite link"
    );

    // A server's settings from its form: AI off, a role mapping, a moderation rule.
    let before = fake.calls().len();
    let r = post(
        format!("/ui/discord/guilds/{GUILD}"),
        f(&[
            ("fleet", "on"),
            ("community", "on"),
            ("cooldown_s", "5"),
            ("per_hour", "10"),
            ("min_severity", "warning"),
            ("alert_channel", "55"),
            ("mod_api_key", "delete"),
            ("roles", "222=operator"),
            ("everyone", ""),
        ]),
    )
    .await;
    assert_eq!(r.status(), 303);
    let v = c.get("/api/v1/discord").await;
    let s = &v["guilds"][0]["settings"];
    assert_eq!(s["groups"]["ai"], false, "{s}");
    assert_eq!(s["roles"]["222"], "operator");
    assert_eq!(s["moderation"]["rules"]["api_key"], "delete");
    assert_eq!(s["alerts"]["min_severity"], "warning");
    let again = fake
        .wait_call("commands registered again", before, |c| {
            c.method == "PUT" && c.path.ends_with("/commands")
        })
        .await;
    assert!(!names(&again.body).contains(&"ask".to_owned()));
    // A bad form changes nothing.
    let r = post(
        format!("/ui/discord/guilds/{GUILD}"),
        f(&[("cooldown_s", "soon"), ("per_hour", "1")]),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        c.get("/api/v1/discord").await["guilds"][0]["settings"]["ai_limits"]["cooldown_s"],
        5
    );

    // Link my account from the dashboard.
    let r = post("/ui/discord/link".into(), f(&[])).await;
    let text = r.text().await.unwrap();
    let code = text
        .split("/link ")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .expect("a code")
        .to_owned();
    let (id, _) = fake.command(GUILD, 60, &[], "link", &[("code", code.as_str())]);
    assert!(content(&callback(&fake, id).await).contains("`admin`"));
    let page = get("/ui/discord").await;
    assert!(
        page.contains("bot-actions") && page.contains("discord.link"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_token_acts_for_the_discord_user_each_request_names() {
    // No bot runs here: a bot elsewhere reaches the API with a `bot` token.
    let c = Controller::start(ControllerOpts::default()).await;
    // Settings (an alert channel too) are kept while no bot is connected.
    settings(
        &c,
        GUILD,
        json!({ "roles": { VIEWERS.to_string(): "viewer", OPERATORS.to_string(): "operator" },
                "alerts": { "channel": "55" } }),
    )
    .await;
    let sinks = c.get("/api/v1/alerts/sinks").await;
    assert!(sinks.to_string().contains("discord-bot"), "{sinks}");
    let out = c.cli(&["api-token", "create", "remote-bot", "--role", "bot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let call = |method: Method, path: &str, headers: &[(&str, &str)]| {
        let mut req = c.client.request(method, c.url(path)).bearer_auth(&token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let guild = GUILD.to_string();
    let as_member = |user: &'static str, roles: &'static str| {
        vec![
            ("x-nebula-discord-user", user),
            ("x-nebula-discord-name", "member"),
            ("x-nebula-discord-guild", leak(guild.clone())),
            ("x-nebula-discord-roles", roles),
        ]
    };
    // Without a Discord user it is nobody.
    let (status, body) = call(Method::GET, "/api/v1/nodes", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("x-nebula-discord-user"), "{body}");
    let (status, _) = call(
        Method::GET,
        "/api/v1/nodes",
        &[("x-nebula-discord-user", "abc")],
    )
    .await;
    assert_eq!(status, 403, "an id is digits");
    // A member with no mapped role is told to link.
    let (status, body) = call(Method::GET, "/api/v1/nodes", &as_member("70", "")).await;
    assert_eq!(status, 403);
    assert!(body.to_string().contains("/link"), "{body}");
    // A viewer-mapped member reads, and may not reconcile.
    let (status, _) = call(Method::GET, "/api/v1/nodes", &as_member("71", "111")).await;
    assert_eq!(status, 200);
    let (status, _) = call(Method::POST, "/api/v1/reconcile", &as_member("71", "111")).await;
    assert_eq!(status, 403);
    // An operator-mapped member may; the audit row names the member, the server and the bot.
    let (status, body) = call(
        Method::POST,
        "/api/v1/reconcile",
        &as_member("72", "111,222"),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let rows = audit_rows(&c, "map.reconcile").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor"], "discord:member");
    assert_eq!(rows[0]["detail"]["discord"]["user"], "72");
    assert_eq!(rows[0]["detail"]["discord"]["guild"], GUILD_S);
    assert_eq!(rows[0]["detail"]["bot"], "remote-bot");
    // The AI gateway takes the same token for the same users (`/ask` from a bot process).
    let chat =
        json!({ "model": "no-such-model", "messages": [{ "role": "user", "content": "hi" }] });
    let ask = |headers: Vec<(&'static str, &'static str)>| {
        let mut req = c
            .client
            .post(c.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&chat);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let (status, body) = ask(as_member("70", "")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("/link"), "{body}");
    let (status, body) = ask(as_member("71", "111")).await;
    assert_eq!(status, 403, "a viewer may not chat: {body}");
    let (status, body) = ask(as_member("72", "111,222")).await;
    assert_eq!(
        status, 404,
        "an operator gets past authorization to no such model: {body}"
    );
}

/// `nebula bot` with the flags that reach this controller and the stand-in.
fn bot_process(c: &Controller, fake: &FakeDiscord, dir: &std::path::Path) -> common::Proc {
    let mut cmd = std::process::Command::new(common::bin("nebula"));
    cmd.args(["bot", "--controller", &c.url("")])
        .arg("--token-file")
        .arg(dir.join("api.token"))
        .arg("--discord-token-file")
        .arg(dir.join("discord.token"))
        .args(["--discord-api-url", &fake.url(), "--confirm-timeout", "1m"])
        .env_remove("NEBULA_TOKEN")
        .env("RUST_LOG", "info");
    common::Proc::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nebula_bot_runs_in_its_own_process_against_a_remote_controller() {
    // The controller has no Discord token: the bot is its own process with a `bot` API token.
    let fake = FakeDiscord::start(&[GUILD]).await;
    let c = Controller::start(ControllerOpts {
        extra: FAST_ALERTS.to_vec(),
        ..ControllerOpts::default()
    })
    .await;
    settings(
        &c,
        GUILD,
        json!({
            "roles": { VIEWERS.to_string(): "viewer", OPERATORS.to_string(): "operator" },
            "alerts": { "channel": "55", "filters": { "rules": ["node_unreachable"] } },
            "moderation": { "rules": { "api_key": "delete" } },
        }),
    )
    .await;
    let out = c.cli(&["api-token", "create", "homelab-bot", "--role", "bot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.token"), &out.stdout).unwrap();
    std::fs::write(dir.path().join("discord.token"), "fake-bot-token\n").unwrap();
    let mut bot = bot_process(&c, &fake, dir.path());
    let first = fake.wait_ready(GUILD).await;
    assert!(first.contains(&"deploy".to_owned()), "{first:?}");
    let status = wait_for("the bot process attached", Duration::from_secs(20), || {
        let c = &c;
        async move {
            let s = c.get("/api/v1/discord").await;
            (s["bot"]["connected"] == true && s["bot"]["remote"].is_string()).then_some(s)
        }
    })
    .await;
    assert!(
        status["guilds"].to_string().contains(GUILD_S),
        "the server is recorded through the API: {status}"
    );

    // One gateway connection per token: a second process is refused and says why.
    let mut second = bot_process(&c, &fake, dir.path());
    let st = second.exit(Duration::from_secs(30)).await;
    assert!(!st.success());
    assert!(
        second
            .output()
            .contains("holds this controller's Discord connection"),
        "{}",
        second.output()
    );

    // Reads and refusals come from the controller's own checks.
    let (id, _) = fake.command(GUILD, 5, &[], "fleet", &[]);
    assert!(content(&callback(&fake, id).await).contains("/link"));
    let (id, _) = fake.command(GUILD, 6, &[VIEWERS], "fleet", &[]);
    assert!(content(&callback(&fake, id).await).contains("**Fleet**"));
    let (id, _) = fake.command(GUILD, 6, &[VIEWERS], "deploy", &[]);
    assert!(content(&callback(&fake, id).await).contains("Refused"));
    // An operator's confirmed deploy is audited with the Discord user, the server and the bot.
    let (id, token) = fake.command(GUILD, 7, &[OPERATORS], "deploy", &[]);
    assert_eq!(callback(&fake, id).await.body["type"], 5);
    let confirm = confirmation(&fake, &token).await;
    let (_, click_token) = fake.click(
        GUILD,
        7,
        &[OPERATORS],
        &format!("nebula:confirm:{confirm}"),
        1,
    );
    edited(&fake, &click_token, "reconciler").await;
    let rows = audit_rows(&c, "map.reconcile").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor"], "discord:user7");
    assert_eq!(rows[0]["detail"]["discord"]["user"], "7");
    assert_eq!(rows[0]["detail"]["discord"]["guild"], GUILD_S);
    assert_eq!(rows[0]["detail"]["bot"], "homelab-bot");

    // /link through the bot's endpoint; then /run streams a node's output by edits.
    let (code, _) = c
        .api(
            Method::POST,
            "/api/v1/users",
            Some(json!({ "username": "alice", "password": "correct horse battery", "role": "operator" })),
        )
        .await;
    assert_eq!(code, 201);
    let out = c.cli(&["user", "link-discord", "alice"]);
    let code = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("/link ").map(str::to_owned))
        .expect("a /link line");
    let (id, _) = fake.command(GUILD, 9, &[], "link", &[("code", code.as_str())]);
    assert!(content(&callback(&fake, id).await).contains("`alice`"));
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_cfg = "[exec.commands.count]\nargv = [\"sh\", \"-c\", \"for i in 1 2 3; do echo tick-$i; sleep 1; done\"]\n";
    let (mut agent, _) = join_ready(&c, agent_dir.path(), "box", &[], Some(agent_cfg)).await;
    let (id, token) = fake.command(
        GUILD,
        9,
        &[],
        "run",
        &[("node", "box"), ("operation", "count")],
    );
    assert_eq!(callback(&fake, id).await.body["type"], 5);
    let confirm = confirmation(&fake, &token).await;
    let (_, click_token) = fake.click(GUILD, 9, &[], &format!("nebula:confirm:{confirm}"), 2);
    let done = edited(&fake, &click_token, "✅ done").await;
    assert!(content(&done).contains("tick-3"), "{done:?}");
    let runs = audit_rows(&c, "job.create").await;
    assert_eq!(runs[0]["actor"], "alice");
    let id = fake.autocomplete(GUILD, 9, &[], "node", "node", "bo");
    assert_eq!(
        callback(&fake, id).await.body["data"]["choices"][0]["value"],
        "box"
    );

    // A toggle switched off on the controller reaches the bot: the server's commands change.
    let before = fake.calls().len();
    settings(
        &c,
        GUILD,
        json!({
            "roles": { VIEWERS.to_string(): "viewer", OPERATORS.to_string(): "operator" },
            "alerts": { "channel": "55", "filters": { "rules": ["node_unreachable"] } },
            "moderation": { "rules": { "api_key": "delete" } },
            "groups": { "ai": false },
        }),
    )
    .await;
    let again = fake
        .wait_call("the server's commands registered again", before, |c| {
            c.method == "PUT" && c.path.ends_with(&format!("/guilds/{GUILD}/commands"))
        })
        .await;
    assert!(!names(&again.body).contains(&"ask".to_owned()));
    // /settings by a server admin goes through the controller's check.
    let (id, _) = fake.command_with(
        GUILD,
        20,
        &[],
        "settings",
        &[("key", "nickname"), ("value", "Nebby")],
        "32",
    );
    assert!(content(&callback(&fake, id).await).contains("changed"));
    assert_eq!(
        c.get("/api/v1/discord").await["guilds"][0]["settings"]["nickname"],
        "Nebby"
    );

    // Moderation: the message is deleted and the audit row is the controller's.
    let leaked = fake.say(
        GUILD,
        5,
        13,
        "key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
    );
    fake.wait_call("the message deleted", 0, |c| {
        c.method == "DELETE" && c.path.ends_with(&format!("/messages/{leaked}"))
    })
    .await;
    let rows = wait_for("the moderation audit row", Duration::from_secs(10), || {
        let c = &c;
        async move {
            let rows = audit(c, "discord.moderation").await;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(rows[0]["detail"]["action"], "deleted");

    // An alert: the controller hands it to the bot process, which posts it with buttons.
    agent.proc.kill();
    let (posted, ack) = unreachable_posted(&fake).await;
    let (id, _) = fake.click(GUILD, 31, &[OPERATORS], &ack, 3);
    assert!(content(&callback(&fake, id).await).contains("Acknowledged"));
    // The bot process reported the delivery: the outbox has it as sent.
    wait_for(
        "the notification marked sent",
        Duration::from_secs(10),
        || {
            let c = &c;
            async move {
                let h = c.get("/api/v1/alerts/notifications").await;
                h.as_array()?
                    .iter()
                    .any(|n| n["sink"] == format!("discord-{GUILD}") && n["state"] == "sent")
                    .then_some(())
            }
        },
    )
    .await;
    // The node comes back: the resolution edits the message through the remembered id.
    let message = posted_id(&posted);
    let _agent = common::Agent::run(&agent_dir.path().join("box"));
    fake.wait_call("the alert message edited as resolved", 0, |c| {
        c.method == "PATCH"
            && c.path
                .ends_with(&format!("/channels/55/messages/{message}"))
            && content(c).contains("resolved")
    })
    .await;

    // Stopped, it detaches: the dashboard says it is not connected.
    assert!(bot.terminate().success() || cfg!(not(unix)));
    let s = c.get("/api/v1/discord").await;
    assert_eq!(s["bot"]["connected"], false, "{s}");
}
