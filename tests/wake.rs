//! Wake-on-LAN through a relay, across network namespaces this test creates: the controller on
//! the "cloud" side (this namespace, reached over a veth), a relay agent in a "home" namespace
//! with a leg on the cloud link and one on the home LAN, and a listener standing in for the
//! sleeping machine in a third namespace on the home LAN only. The controller has no route into
//! the home LAN; only the relay can broadcast there.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and two veth pairs; removed on drop.
struct Lab {
    home: String,
    target: String,
    cloud_link: String,
    /// Third octet of 10.77.N.0/24 (cloud link) and 192.168.N.0/24 (home LAN).
    n: u32,
}

impl Lab {
    fn new() -> Lab {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        assert!(
            is_root,
            "the Wake-on-LAN test creates network namespaces and needs root"
        );
        let id = std::process::id();
        let n = 20 + id % 200;
        let lab = Lab {
            home: format!("nbhome{id}"),
            target: format!("nbtgt{id}"),
            cloud_link: format!("nbc{id}"),
            n,
        };
        let (home, target) = (lab.home.as_str(), lab.target.as_str());
        ip(&["netns", "add", home]);
        ip(&["netns", "add", target]);
        // Cloud link: this namespace <-> home (the relay's uplink).
        let peer = format!("nbh{id}");
        ip(&[
            "link",
            "add",
            &lab.cloud_link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", home]);
        ip(&[
            "addr",
            "add",
            &format!("10.77.{n}.1/24"),
            "dev",
            &lab.cloud_link,
        ]);
        ip(&["link", "set", &lab.cloud_link, "up"]);
        ip(&[
            "-n",
            home,
            "addr",
            "add",
            &format!("10.77.{n}.2/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", home, "link", "set", &peer, "up"]);
        // Home LAN: home <-> target.
        let (lan_h, lan_t) = (format!("nbl{id}"), format!("nbt{id}"));
        ip(&[
            "-n", home, "link", "add", &lan_h, "type", "veth", "peer", "name", &lan_t,
        ]);
        ip(&["-n", home, "link", "set", &lan_t, "netns", target]);
        ip(&[
            "-n",
            home,
            "addr",
            "add",
            &format!("192.168.{n}.2/24"),
            "brd",
            "+",
            "dev",
            &lan_h,
        ]);
        ip(&["-n", home, "link", "set", &lan_h, "up"]);
        ip(&[
            "-n",
            target,
            "addr",
            "add",
            &format!("192.168.{n}.3/24"),
            "brd",
            "+",
            "dev",
            &lan_t,
        ]);
        ip(&["-n", target, "link", "set", &lan_t, "up"]);
        for ns in [home, target] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.home, &self.target] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.cloud_link])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_the_home_lan_sends_exactly_one_magic_packet() {
    let lab = Lab::new();
    let n = lab.n;
    let quic: SocketAddr = format!("10.77.{n}.1:0").parse().unwrap();
    let c = Controller::start(ControllerOpts {
        quic_listen: Some(quic),
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
    c.wait_status("relay", "online", Duration::from_secs(30))
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
             end = time.time() + 8\n\
             while time.time() < end:\n\
             \x20   try:\n\
             \x20       data, addr = s.recvfrom(2048)\n\
             \x20       print(len(data), data.hex(), addr[0], flush=True)\n\
             \x20   except socket.timeout:\n\
             \x20       pass\n",
        );
    let mut listener = Proc::spawn(listen);
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
    assert_eq!(job["state"], "succeeded", "{job}");
    let logs = c
        .client
        .get(c.url(&format!(
            "/api/v1/jobs/{}/logs?follow=false",
            job["id"].as_str().unwrap()
        )))
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
    listener.exit(Duration::from_secs(15)).await;
    let packets: Vec<String> = listener
        .stdout
        .text()
        .lines()
        .filter(|l| !l.starts_with("listening"))
        .map(str::to_owned)
        .collect();
    assert_eq!(packets.len(), 1, "exactly one packet: {packets:?}");
    let fields: Vec<&str> = packets[0].split(' ').collect();
    assert_eq!(fields[0], "102");
    let expected = format!("{}{}", "ff".repeat(6), "525400abcdef".repeat(16));
    assert_eq!(fields[1], expected, "a valid magic packet for the MAC");
    assert_eq!(fields[2], format!("192.168.{n}.2"));

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
}
