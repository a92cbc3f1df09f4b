//! Everything the controller and agent must refuse, each with a clear error, and without
//! disturbing the agents that behave.

use crate::common;

use common::session::{close_reason, enrolled_identity, hello, raw_session, welcomed};

use std::sync::Arc;
use std::time::Duration;

use common::{Agent, Controller, ControllerOpts};
use nebula_agent::Identity;
use nebula_protocol::{
    self as proto, close, JoinToken, ProtocolVersion, RefusalCode, ServerHello, ALPN_SESSION,
    CONTROLLER_SERVER_NAME,
};
use serde_json::json;

async fn refused_join(c: &Controller, token: &str, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::join(c, token, &dir.path().join(name), name, &[]);
    let st = a.proc.exit(Duration::from_secs(20)).await;
    assert!(!st.success(), "join with a bad token must fail");
    assert!(c.node(name).await.is_none(), "no node was created");
    assert!(
        !dir.path().join(name).join("node.crt").exists(),
        "no identity saved"
    );
    a.proc.output()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_join_tokens_are_refused_with_clear_errors() {
    let c = Controller::start(ControllerOpts::default()).await;

    // Single-use token used twice.
    let once = c.token(1, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let _first = Agent::join(&c, &once, &dir.path().join("first"), "first", &[]);
    c.wait_status("first", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let out = refused_join(&c, &once, "second").await;
    assert!(out.contains("no uses left"), "{out}");

    // Expired token.
    let short = c.token(5, "1s", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = refused_join(&c, &short, "late").await;
    assert!(out.contains("expired"), "{out}");

    // Unknown token (right pin, made-up credentials).
    let mut unknown: JoinToken = once.parse().unwrap();
    unknown.id = "doesnotexist".into();
    let out = refused_join(&c, &unknown.to_string(), "stranger").await;
    assert!(out.contains("unknown join token"), "{out}");

    // Revoked token.
    let revoked = c.token(5, "1h", json!({})).await;
    let id = revoked.parse::<JoinToken>().unwrap().id;
    let (status, _) = c
        .api(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let out = refused_join(&c, &revoked, "too-late").await;
    assert!(out.contains("revoked"), "{out}");

    // A token whose CA pin does not match: the agent refuses the controller.
    let mut wrong_pin: JoinToken = c.token(5, "1h", json!({})).await.parse().unwrap();
    wrong_pin.ca_sha256[0] ^= 0xff;
    let out = refused_join(&c, &wrong_pin.to_string(), "pinned").await;
    assert!(out.contains("does not match the pin"), "{out}");
    // ...and the token was not spent: the controller never saw it.
    let tokens: common::Page<nebula_types::api::access::TokenView> =
        c.get_as("/api/v1/tokens").await;
    let t = tokens.items.iter().find(|t| t.id == wrong_pin.id).unwrap();
    assert_eq!(t.uses, 0);

    // The good node was never disturbed.
    c.wait_status("first", common::NodeStatus::Online, Duration::from_secs(1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_major_mismatch_is_refused_naming_both_versions() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = enrolled_identity(&c, "future", dir.path()).await;
    let conn = raw_session(&id, &c).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let future = ProtocolVersion {
        major: proto::PROTOCOL_VERSION.major + 1,
        minor: 4,
    };
    proto::write_message(&mut send, &hello(future))
        .await
        .unwrap();
    let reply: ServerHello = proto::read_message(&mut recv, 1 << 20).await.unwrap();
    let ServerHello::Refused(r) = reply else {
        panic!("expected a refusal, got {reply:?}")
    };
    assert_eq!(r.code, RefusalCode::VersionMismatch);
    assert!(r.message.contains(&future.to_string()), "{}", r.message);
    assert!(
        r.message.contains(&proto::PROTOCOL_VERSION.to_string()),
        "{}",
        r.message
    );
    assert_eq!(r.version, proto::PROTOCOL_VERSION);
    conn.close(0u32.into(), b"");
    // Logged on the controller side too.
    common::wait_for(
        "the controller to log the refusal",
        Duration::from_secs(5),
        || async {
            c.proc
                .stderr
                .text()
                .contains("protocol version mismatch")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        c.node("future").await.unwrap().status,
        common::NodeStatus::Offline
    );

    // The real agent binary, when refused like this, stops and says why; simulated here by
    // a same-major Hello succeeding on the same identity (the refusal changed nothing).
    let (_conn, _send, _recv, welcome) = welcomed(&id, &c).await;
    assert_eq!(welcome.name, "future");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_close_only_that_connection() {
    let mut c = Controller::start(ControllerOpts {
        max_frame_bytes: Some(64 * 1024),
        ..ControllerOpts::default()
    })
    .await;
    // A well-behaved agent that must keep being served throughout.
    let token = c.token(1, "1h", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let _good = Agent::join(&c, &token, &dir.path().join("good"), "good", &[]);
    c.wait_status("good", common::NodeStatus::Online, Duration::from_secs(20))
        .await;
    let id = enrolled_identity(&c, "noisy", &dir.path().join("noisy")).await;

    // A frame header announcing 1 MiB against a 64 KiB limit: refused before allocating.
    let conn = raw_session(&id, &c).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&(1024u32 * 1024).to_le_bytes())
        .await
        .unwrap();
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, close::PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // Garbage bytes as a Hello.
    let conn = raw_session(&id, &c).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut junk = 12u32.to_le_bytes().to_vec();
    junk.extend_from_slice(&[0xff; 12]);
    send.write_all(&junk).await.unwrap();
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, close::PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("malformed"), "{reason}");

    // After a good Hello: a message variant from a newer minor is answered "unsupported" and
    // the session goes on; then a malformed message closes the connection.
    let (conn, mut send, mut recv, _welcome) = welcomed(&id, &c).await;
    proto::write_frame(&mut send, &[200]).await.unwrap();
    // (A 1.3 session first hears which agent builds the controller serves, a 1.7 one which
    // monitors it runs.)
    let reply = loop {
        let m: proto::ControllerMessage = proto::read_message(&mut recv, 1 << 20).await.unwrap();
        if !matches!(
            m,
            proto::ControllerMessage::AgentReleases(_) | proto::ControllerMessage::Monitors(_)
        ) {
            break m;
        }
    };
    assert_eq!(
        reply,
        proto::ControllerMessage::Unsupported { variant: 200 }
    );
    // Variant 0 (RenewCertificate) whose byte-string length is cut off.
    proto::write_frame(&mut send, &[0, 0xfd, 0xff])
        .await
        .unwrap();
    let (code, _) = close_reason(&conn).await;
    assert_eq!(code, close::PROTOCOL_ERROR);

    // The controller still serves: the good agent is online, the API answers, and the noisy
    // node can still open a proper session.
    c.wait_status("good", common::NodeStatus::Online, Duration::from_secs(1))
        .await;
    assert!(
        c.proc.child.try_wait().unwrap().is_none(),
        "controller still running"
    );
    let _ = welcomed(&id, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_a_client_certificate_from_the_fleet_ca() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let real = enrolled_identity(&c, "real", dir.path()).await;

    // No client certificate on nebula/1: refused right after the handshake, with the reason.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(real.ca_der.clone()))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = nebula_agent::tls::client_endpoint(c.quic).unwrap();
    let conn = ep
        .connect_with(cfg, c.quic, CONTROLLER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (code, reason) = close_reason(&conn).await;
    assert_eq!(code, close::REFUSED);
    assert!(reason.contains("client certificate required"), "{reason}");

    // A client certificate from a foreign CA, even one claiming a real node's id: the TLS
    // handshake fails.
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_ca = ca_params.self_signed(&foreign_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &foreign_key);
    let node_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![format!(
        "{}{}",
        real.state.node_id,
        proto::NODE_SAN_SUFFIX
    )])
    .unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = leaf.signed_by(&node_key, &issuer).unwrap();
    let _ = foreign_ca;
    let impostor = Identity {
        state: real.state.clone(),
        key_der: node_key.serialize_der(),
        cert_der: forged.der().to_vec(),
        ca_der: real.ca_der.clone(),
    };
    let cfg = nebula_agent::tls::session_config(
        &impostor,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .unwrap();
    let result = async {
        let conn = ep
            .connect_with(cfg, c.quic, CONTROLLER_SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        proto::write_message(&mut send, &hello(proto::PROTOCOL_VERSION)).await?;
        let reply: ServerHello = proto::read_message(&mut recv, 1 << 20).await?;
        anyhow::Ok(reply)
    }
    .await;
    let err = result.expect_err("a foreign-CA certificate must not get a session");
    let text = format!("{err:#}");
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );
    // The real node was never marked online by the impostor.
    assert_eq!(
        c.node("real").await.unwrap().status,
        common::NodeStatus::Offline
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_a_valid_token_and_rejects_bad_bodies() {
    let c = Controller::start(ControllerOpts::default()).await;
    let http = reqwest::Client::new();
    for (path, token) in [
        ("/api/v1/nodes", None),
        ("/api/v1/nodes", Some("nbl_wrong")),
        ("/api/v1/tokens", Some("")),
    ] {
        let mut req = http.get(c.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path} with {token:?}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(common::error_of(&body).code, "unauthorized");
        assert!(common::error_of(&body).message.len() > 5);
    }
    // Health needs no token.
    assert_eq!(
        http.get(c.url("/healthz")).send().await.unwrap().status(),
        200
    );

    // Bad bodies: clear 4xx errors and no token created.
    for body in [
        json!({"ttl": "soon"}),
        json!({"uses": 0}),
        json!({"uses": -1}),
        json!({"labels": {"bad key!": "x"}}),
        json!({"unknown_field": true}),
        json!({"ttl": "0s"}),
    ] {
        let (status, v) = c
            .api(reqwest::Method::POST, "/api/v1/tokens", Some(body.clone()))
            .await;
        assert_eq!(status / 100, 4, "{body} -> {status} {v}");
        assert!(!common::error_of(&v).message.is_empty(), "{v}");
    }
    let resp = http
        .post(c.url("/api/v1/tokens"))
        .bearer_auth(&c.admin_token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let tokens: common::Page<nebula_types::api::access::TokenView> =
        c.get_as("/api/v1/tokens").await;
    assert_eq!(tokens.items.len(), 0);
    let (status, v) = c
        .api(reqwest::Method::GET, "/api/v1/nodes/nobody", None)
        .await;
    assert_eq!(
        (status, Some(common::error_of(&v).code.as_str())),
        (404, Some("not_found"))
    );
    let (status, _) = c
        .api(reqwest::Method::GET, "/api/v1/nodes?limit=0", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = c
        .api(reqwest::Method::GET, "/api/v1/no-such-thing", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_from_the_same_node_replaces_the_old_one() {
    let c = Controller::start(ControllerOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = enrolled_identity(&c, "twin", dir.path()).await;
    let (old, _s1, _r1, _) = welcomed(&id, &c).await;
    let first = c
        .wait_status("twin", common::NodeStatus::Online, Duration::from_secs(5))
        .await;
    let (new, _s2, _r2, _) = welcomed(&id, &c).await;
    let (code, reason) = close_reason(&old).await;
    assert_eq!(code, close::REPLACED, "{reason}");
    // Still online (the old session's end did not mark it offline), on the new connection.
    let now = c
        .wait_status("twin", common::NodeStatus::Online, Duration::from_secs(5))
        .await;
    assert_ne!(first.remote_addr, now.remote_addr);
    assert!(new.close_reason().is_none(), "the new connection is alive");
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 200 enrollment connections that send half a frame and then stall, pinging to stay alive and
/// trying to open more streams: a real agent still joins within 5 s, the stalled ones are cut
/// off at the enrollment deadline, extra streams never open, and the controller's memory stays
/// bounded. A raw QUIC client plays the attacker; the agent is the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_enrollments_cannot_keep_a_real_agent_out() {
    let (c, _dir) = controller_with_config(
        "[quic_limits]\nenroll_deadline = \"4s\"\nmax_unauthenticated_per_source = 20\n",
    )
    .await;
    let token_text = c.token(1, "1h", json!({})).await;
    let token: JoinToken = token_text.parse().unwrap();
    let pid = c.proc.child.id();
    let rss_before = rss_kib(pid);

    let mut cfg = nebula_agent::tls::enroll_config(token.ca_sha256).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap()));
    cfg.transport_config(Arc::new(transport));
    // 20 connections from each of 10 addresses (the per-source cap is 20 here).
    let mut stalled = Vec::new();
    let mut endpoints = Vec::new();
    for source in 2..12u8 {
        let mut ep =
            quinn::Endpoint::client(format!("127.0.0.{source}:0").parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg.clone());
        let opened = futures::future::join_all((0..20).map(|_| {
            let ep = ep.clone();
            let quic = c.quic;
            async move {
                let conn = ep
                    .connect(quic, CONTROLLER_SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap();
                let (mut send, recv) = conn.open_bi().await.unwrap();
                // A frame announcing 60,000 bytes, then 100 of them, then nothing.
                send.write_all(&60_000u32.to_le_bytes()).await.unwrap();
                send.write_all(&[7u8; 100]).await.unwrap();
                (conn, send, recv)
            }
        }))
        .await;
        stalled.extend(opened);
        endpoints.push(ep);
    }
    assert_eq!(stalled.len(), 200);
    // The 21st from one address is turned away: busy, at once.
    let extra = endpoints[0]
        .connect(c.quic, CONTROLLER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (code, reason) = close_reason(&extra).await;
    assert_eq!(code, close::BUSY, "{reason}");
    assert!(reason.contains("busy"), "{reason}");
    // No more streams for an unauthenticated peer: a second one never opens.
    for (conn, _, _) in stalled.iter().take(5) {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), conn.open_uni())
                .await
                .is_err(),
            "a unidirectional stream opened before authentication"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), conn.open_bi())
                .await
                .is_err(),
            "a second stream opened before authentication"
        );
    }
    let rss_loaded = rss_kib(pid);

    // A real agent joins from 127.0.0.1 while all of that stalls.
    let started = std::time::Instant::now();
    let agent_dir = tempfile::tempdir().unwrap();
    let _agent = Agent::join(&c, &token_text, &agent_dir.path().join("real"), "real", &[]);
    c.wait_status("real", common::NodeStatus::Online, Duration::from_secs(5))
        .await;
    let joined = started.elapsed();

    // The stalled connections are cut off by the enrollment deadline (4 s here).
    for (conn, _, _) in &stalled {
        let (code, reason) = close_reason(conn).await;
        assert_eq!(code, close::PROTOCOL_ERROR, "{reason}");
        assert!(reason.contains("took too long"), "{reason}");
    }
    let grew_mib = rss_loaded.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "controller RSS {:.1} MiB before, {:.1} MiB with 200 stalled enrollments (+{grew_mib:.1} MiB); real agent online after {joined:?}",
        rss_before as f64 / 1024.0,
        rss_loaded as f64 / 1024.0,
    );
    assert!(
        grew_mib < 32.0,
        "200 stalled enrollments cost {grew_mib:.1} MiB (bound: 32 MiB)"
    );
    // The caps turned connections away and said so in /metrics.
    let metrics = c.metrics().await;
    assert!(
        common::metric(
            &metrics,
            "nebula_connections_refused_total{reason=\"max_unauthenticated\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

/// Read from `stream` until the server closes it (or 10 s pass); what it sent and how long.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept a slow connection open for 10 s"),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// Slow HTTP clients cannot hold the listener: unfinished headers, idle keep-alives and
/// trickled bodies are cut off at their deadlines, connections past the cap wait for a slot
/// rather than pile up, and the gateway refuses at once a body that would pass its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off_and_buffers_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let (c, _dir) = controller_with_config(
        "[http_limits]\nheader_timeout = \"1s\"\nbody_timeout = \"1500ms\"\nmax_connections = 8\n\
         [ai]\nmax_buffered_bytes = 3145728\n",
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(c.http);

    // Headers that never finish: closed at the header deadline.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut slow).await;
    assert!(took < Duration::from_secs(4), "closed after {took:?}");

    // An idle keep-alive connection after a request: closed too.
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took < Duration::from_secs(4), "idle for {took:?}");

    // A body that trickles: the request fails at the body deadline.
    let mut trickle = connect().await.unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"op\":",
        c.admin_token
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = read_until_closed(&mut trickle).await;
    assert!(took < Duration::from_secs(5), "held for {took:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );

    // Eight connections with unfinished headers fill the cap: a ninth request waits for one
    // of them to be cut off, and is then served.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = connect().await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ninth = connect().await.unwrap();
    ninth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut ninth).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took >= Duration::from_millis(500),
        "served in {took:?} although the cap was reached"
    );
    drop(held);

    // The gateway's body budget (3 MiB here): while one 2 MiB body is being received, a
    // second is refused at once instead of buffered.
    let gateway_post = |len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
            c.admin_token
        )
    };
    let mut first = connect().await.unwrap();
    first
        .write_all(gateway_post(2 << 20).as_bytes())
        .await
        .unwrap();
    first.write_all(&[b' '; 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&c.admin_token)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 503);
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(common::error_of(&body).code, "busy", "{body}");
    // Once the first is cut off, the budget is back.
    let _ = read_until_closed(&mut first).await;
    let third = c
        .client
        .post(c.url("/v1/chat/completions"))
        .bearer_auth(&c.admin_token)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_ne!(third.status(), 503, "the budget was given back");
}

/// The caps answer "busy" rather than queue; `nebula-agent join` tries again with backoff, so
/// many hosts behind one address can all join at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tries_again_while_the_controller_is_busy() {
    let (c, _dir) = controller_with_config(
        "[quic_limits]\nenroll_deadline = \"2s\"\nmax_unauthenticated_per_source = 1\n",
    )
    .await;
    let token_text = c.token(1, "1h", json!({})).await;
    let token: JoinToken = token_text.parse().unwrap();
    // One stalled enrollment from 127.0.0.1 takes the address's only slot for 2 s.
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(nebula_agent::tls::enroll_config(token.ca_sha256).unwrap());
    let stalled = ep
        .connect(c.quic, CONTROLLER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = stalled.open_bi().await.unwrap();
    send.write_all(&1000u32.to_le_bytes()).await.unwrap();
    // A real agent from the same address: busy at first, then in.
    let agent_dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::join(&c, &token_text, &agent_dir.path().join("n1"), "n1", &[]);
    c.wait_status("n1", common::NodeStatus::Online, Duration::from_secs(15))
        .await;
    let out = agent.proc.output();
    assert!(
        out.contains("busy") && out.contains("trying again"),
        "{out}"
    );
    let (code, _) = close_reason(&stalled).await;
    assert_eq!(code, close::PROTOCOL_ERROR);
    agent.proc.kill();
}

/// A controller started with `toml` as its config file (besides the harness's usual flags).
async fn controller_with_config(toml: &str) -> (Controller, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, toml).unwrap();
    let config: &'static str = Box::leak(config.display().to_string().into_boxed_str());
    let c = Controller::start(ControllerOpts {
        extra: vec!["--config", config],
        ..ControllerOpts::default()
    })
    .await;
    (c, dir)
}
