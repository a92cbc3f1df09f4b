//! Wake-on-LAN through a relay, across network namespaces this test creates: the controller on
//! the "cloud" side (this namespace, reached over a veth), a relay agent in a "home" namespace
//! with a leg on the cloud link and one on the home LAN, and a listener standing in for the
//! sleeping machine in a third namespace on the home LAN only. The controller has no route into
//! the home LAN; only the relay can broadcast there.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::netlab::Lab;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_through_a_relay_on_demand_and_by_hand() {
    let lab = Lab::new();
    let n = lab.n;
    let quic: SocketAddr = format!("10.77.{n}.1:0").parse().unwrap();
    let c = Controller::start(ControllerOpts {
        quic_listen: Some(quic),
        extra: vec!["--wake-timeout", "8s"],
        ..Default::default()
    })
    .await;
    // The relay agent lives in the home namespace and dials the controller over the cloud link.
    let dir = tempfile::tempdir().unwrap();
    let token = c.token(1, "10m", json!({})).await;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.home])
        .arg(bin("nebula-agent"))
        .args([
            "join",
            "--controller",
            &c.quic.to_string(),
            "--token",
            &token,
        ])
        .arg("--state-dir")
        .arg(dir.path().join("relay"))
        .args(["--name", "relay"]);
    let _relay = Proc::spawn(cmd);
    c.wait_status("relay", common::NodeStatus::Online, Duration::from_secs(30))
        .await;

    // The machine to wake: a UDP listener on port 9 on the home LAN only, printing what arrives.
    let mut listen = Command::new("ip");
    listen
        .args(["netns", "exec", &lab.target, "python3", "-u", "-c"])
        .arg(
            "import socket, sys, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
             s.bind(('0.0.0.0', 9))\n\
             print('listening', flush=True)\n\
             s.settimeout(0.5)\n\
             end = time.time() + 90\n\
             while time.time() < end:\n\
             \x20   try:\n\
             \x20       data, addr = s.recvfrom(2048)\n\
             \x20       print(len(data), data.hex(), addr[0], flush=True)\n\
             \x20   except socket.timeout:\n\
             \x20       pass\n",
        );
    let listener = Proc::spawn(listen);
    wait_for("the listener", Duration::from_secs(10), || async {
        listener.stdout.find("listening").map(|_| ())
    })
    .await;

    // Wake through the relay: one job, one packet, from the relay's home-LAN address.
    let job = c
        .job(json!({
            "node": "relay",
            "work": {"kind": "wake", "mac": "52:54:00:ab:cd:ef", "broadcast": format!("192.168.{n}.255")},
            "wait": "10s"
        }))
        .await;
    assert_eq!(job.state, common::JobState::Succeeded, "{job:?}");
    let logs = c
        .client
        .get(c.url(&format!("/api/v1/jobs/{}/logs?follow=false", job.id)))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        logs.contains(&format!("from 192.168.{n}.2")),
        "the packet leaves from the relay's address on that LAN: {logs}"
    );
    let packets = |mac: &str| -> Vec<Vec<String>> {
        listener
            .stdout
            .text()
            .lines()
            .filter(|l| !l.starts_with("listening"))
            .map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| f.get(1).is_some_and(|h| h.ends_with(&mac.repeat(16))))
            .collect()
    };
    wait_for("the packet", Duration::from_secs(10), || async {
        (!packets("525400abcdef").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = packets("525400abcdef");
    assert_eq!(got.len(), 1, "exactly one packet: {got:?}");
    assert_eq!(got[0][0], "102");
    let expected = format!("{}{}", "ff".repeat(6), "525400abcdef".repeat(16));
    assert_eq!(got[0][1], expected, "a valid magic packet for the MAC");
    assert_eq!(got[0][2], format!("192.168.{n}.2"));

    // A bad MAC or broadcast is refused before any agent sees it.
    let (status, v) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(json!({"node": "relay", "work": {"kind": "wake", "mac": "52:54:00"}})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(json!({"node": "relay", "work": {"kind": "wake", "mac": "52:54:00:ab:cd:ef", "broadcast": "home"}})),
        )
        .await;
    assert_eq!(status, 400);

    // Two more nodes, enrolled then asleep: `target` (woken by hand) and `sleeper` (woken when a
    // job needs it, and never comes back). Their agents run in this namespace; the listener
    // stands in for their network cards on the home LAN.
    let config = "[exec.commands.suspend]\nargv = [\"true\"]\n";
    let mut target = Agent::join_with_config(
        &c,
        &c.token(1, "10m", json!({})).await,
        &dir.path().join("target"),
        "target",
        &[],
        config,
    );
    let mut sleeper = Agent::join(
        &c,
        &c.token(1, "10m", json!({})).await,
        &dir.path().join("sleeper"),
        "sleeper",
        &[],
    );
    c.wait_status(
        "target",
        common::NodeStatus::Online,
        Duration::from_secs(30),
    )
    .await;
    c.wait_status(
        "sleeper",
        common::NodeStatus::Online,
        Duration::from_secs(30),
    )
    .await;
    target.proc.kill();
    sleeper.proc.kill();
    c.wait_status(
        "target",
        common::NodeStatus::Offline,
        Duration::from_secs(30),
    )
    .await;
    c.wait_status(
        "sleeper",
        common::NodeStatus::Offline,
        Duration::from_secs(30),
    )
    .await;
    let map = format!(
        "nodes:\n  relay: {{}}\n  target:\n    wake: {{ mac: '52:54:00:00:00:0b', broadcast: 192.168.{n}.255, via: [relay] }}\n    sleep: suspend\n  sleeper:\n    wake: {{ mac: '52:54:00:00:00:0c', broadcast: 192.168.{n}.255, via: [relay] }}\nservices: {{}}\n"
    );
    let resp = c
        .client
        .put(c.url("/api/v1/desired"))
        .bearer_auth(&c.admin_token)
        .body(map)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );

    // `nebula wake target`: one packet for its MAC; it shows `waking`.
    let out = c.cli(&["wake", "target"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("through relay"));
    assert_eq!(
        c.node("target").await.unwrap().status,
        common::NodeStatus::Waking
    );
    wait_for("target's packet", Duration::from_secs(10), || async {
        (packets("52540000000b").len() == 1).then_some(())
    })
    .await;
    // A job for it waits; being woken already, it is not woken twice.
    let job = c
        .job(json!({"node": "target", "work": {"kind": "noop"}, "deadline": "2m"}))
        .await;
    assert_eq!(job.state, common::JobState::Queued, "{job:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The machine wakes up: its agent starts and registers; the waiting job goes to it.
    let _target = Agent::run_with_config(&dir.path().join("target"));
    let done = c
        .wait_job(job.id, "the waiting job", Duration::from_secs(30), |j| {
            j.state == common::JobState::Succeeded
        })
        .await;
    assert_eq!(done.node.as_deref(), Some("target"));
    c.wait_status(
        "target",
        common::NodeStatus::Online,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(packets("52540000000b").len(), 1, "woken once");

    // Wake on demand: a job that only the sleeping `sleeper` fits wakes it through the relay;
    // it never registers, so after the wake timeout it is `wake_failed`.
    let job = c
        .job(json!({"node": "sleeper", "work": {"kind": "noop"}, "deadline": "1m"}))
        .await;
    wait_for("sleeper's packet", Duration::from_secs(10), || async {
        (packets("52540000000c").len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        c.node("sleeper").await.unwrap().status,
        common::NodeStatus::Waking
    );
    c.wait_status(
        "sleeper",
        common::NodeStatus::WakeFailed,
        Duration::from_secs(20),
    )
    .await;
    let failed: common::Page<common::NodeView> = c.get_as("/api/v1/nodes?status=wake_failed").await;
    assert_eq!(failed.items[0].name, "sleeper", "{failed:?}");
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/jobs/{}/cancel", job.id),
            None,
        )
        .await;
    assert!(status == 200 || status == 202, "cancelled: {status}");

    // `nebula sleep target` runs its allow-listed suspend command.
    let out = c.cli(&["sleep", "target"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Waking a node without wake settings, or one that is online, is refused.
    let (status, v) = c
        .api(reqwest::Method::POST, "/api/v1/nodes/relay/wake", None)
        .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = c
        .api(reqwest::Method::POST, "/api/v1/nodes/target/wake", None)
        .await;
    assert_eq!(status, 409, "{v}");
}
