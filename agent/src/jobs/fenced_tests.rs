//! A job from a leader of a lower term than this agent has seen is refused, runs nothing and
//! leaves nothing in the journal: the same job from the current leader then runs. Over a real
//! QUIC connection on 127.0.0.1 (the runner serves the streams as in a session).

use std::sync::Arc;

use nebula_protocol::jobs::{JobControl, JobEvent, JobRequest, JobSpec, JobStatus};
use nebula_protocol::{self as proto, NodeFacts};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{JobRunner, RunnerConfig};

/// A connected pair: (the controller's end, the agent's end).
async fn pair() -> (quinn::Connection, quinn::Connection, quinn::Endpoint) {
    crate::tls::install_provider();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let server_tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let server_cfg =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).unwrap()));
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).unwrap(),
    )));
    let addr = server.local_addr().unwrap();
    let (agent, controller) = tokio::join!(
        async { client.connect(addr, "localhost").unwrap().await.unwrap() },
        async { server.accept().await.unwrap().await.unwrap() }
    );
    (controller, agent, client)
}

/// Send one job as `control` and read the agent's events to the end.
async fn send(
    controller: &quinn::Connection,
    agent: &quinn::Connection,
    runner: &Arc<JobRunner>,
    control: JobControl,
) -> Vec<JobEvent> {
    let (mut send, mut recv) = controller.open_bi().await.unwrap();
    send.write_all(&proto::encode_frame(&control).unwrap())
        .await
        .unwrap();
    let (asend, arecv) = agent.accept_bi().await.unwrap();
    runner.clone().spawn_stream(asend, arecv);
    let mut events = Vec::new();
    let mut frames = proto::FrameReader::new(proto::DEFAULT_MAX_FRAME);
    while let Ok(ev) = frames.read_message::<JobEvent, _>(&mut recv).await {
        let done = matches!(ev, JobEvent::Finished(_));
        events.push(ev);
        if done {
            break;
        }
    }
    events
}

#[tokio::test]
async fn a_job_of_a_lower_term_is_refused_and_not_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let runner = JobRunner::new(
        RunnerConfig::defaults(NodeFacts::default(), None),
        dir.path(),
    )
    .unwrap();
    assert_eq!(runner.terms.admit(10), Ok(true));
    let (controller, agent, _client) = pair().await;
    let request = JobRequest {
        id: uuid::Uuid::now_v7(),
        attempt: 1,
        deadline_unix_ms: None,
        logs_from: 0,
        spec: JobSpec::Noop,
    };
    let fenced = |term| JobControl::Fenced {
        term,
        request: request.clone(),
    };

    let events = send(&controller, &agent, &runner, fenced(9)).await;
    let Some(JobEvent::Finished(result)) = events.last() else {
        panic!("no result: {events:?}");
    };
    assert_eq!(result.status, JobStatus::Refused);
    let why = result.error.as_deref().unwrap_or_default();
    assert!(
        why.contains("term 9 is over") && why.contains("term 10"),
        "{why}"
    );
    assert_eq!(runner.terms.highest(), 10);

    // The same job from the leader of term 10 runs: the refusal was not kept.
    let events = send(&controller, &agent, &runner, fenced(10)).await;
    assert!(
        matches!(events.first(), Some(JobEvent::Accepted { resumed: false })),
        "{events:?}"
    );
    let Some(JobEvent::Finished(result)) = events.last() else {
        panic!("no result: {events:?}");
    };
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    // A newer leader raises the term.
    let events = send(
        &controller,
        &agent,
        &runner,
        JobControl::Fenced {
            term: 11,
            request: JobRequest {
                id: uuid::Uuid::now_v7(),
                ..request.clone()
            },
        },
    )
    .await;
    assert!(
        matches!(events.last(), Some(JobEvent::Finished(r)) if r.status == JobStatus::Succeeded)
    );
    assert_eq!(runner.terms.highest(), 11);
}
