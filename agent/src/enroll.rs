//! Joining the fleet: prove a join token over `nebula-enroll/1`, receive a certificate for a key
//! generated here.

use std::net::SocketAddr;
use std::time::Duration;

use nebula_protocol::{
    self as proto, EnrollRequest, EnrollResponse, JoinToken, Labels, NodeFacts, RefusalCode,
    CONTROLLER_SERVER_NAME, PROTOCOL_VERSION,
};
use tracing::info;

use crate::identity::{new_key_and_csr, AgentState, Identity, StateDir};
use crate::{tls, AgentError};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// What enrollment needs.
#[derive(Debug, Clone)]
pub struct EnrollParams {
    /// The address as given (saved for later sessions).
    pub controller: String,
    pub addr: SocketAddr,
    pub token: JoinToken,
    pub name: String,
    pub labels: Labels,
    pub facts: NodeFacts,
}

/// How long enrollment keeps trying while the controller says it is busy (its caps on
/// enrollments at once, in all and per source address, answer "busy" rather than queue).
const BUSY_RETRY_FOR: Duration = Duration::from_secs(60);
const BUSY_FIRST_BACKOFF: Duration = Duration::from_millis(250);
const BUSY_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One enrollment exchange ended without an answer because the controller was busy.
struct Busy(String);

/// Enroll and save the identity in `state`. A "busy" controller is tried again with capped,
/// jittered backoff for up to [`BUSY_RETRY_FOR`].
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    params: EnrollParams,
    state: &StateDir,
) -> Result<Identity, AgentError> {
    let (key, csr_der) = new_key_and_csr()?;
    let give_up = tokio::time::Instant::now() + BUSY_RETRY_FOR;
    let mut backoff = BUSY_FIRST_BACKOFF;
    let resp = loop {
        match exchange(endpoint, &params, &csr_der).await? {
            Ok(resp) => break resp,
            Err(Busy(reason)) => {
                let jitter = Duration::from_millis(rand::random::<u64>() % 250);
                let wait = backoff + jitter;
                if tokio::time::Instant::now() + wait > give_up {
                    return Err(AgentError::Closed(reason));
                }
                info!("{reason}; trying again in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(BUSY_MAX_BACKOFF);
            }
        }
    };
    match resp {
        EnrollResponse::Enrolled(e) => {
            let st = AgentState {
                controller: params.controller,
                node_id: e.node_id,
                name: e.name.clone(),
                settings: Some(e.settings.clone()),
                replicas: Vec::new(),
                term: 0,
            };
            state.save(&st, &key, &e.cert_der, &e.ca_der)?;
            info!(node = %e.node_id, name = %e.name, labels = ?e.labels, "enrolled");
            Ok(state.load()?)
        }
        EnrollResponse::Refused(r) => Err(AgentError::Refused(r)),
    }
}

/// One enrollment exchange: the answer, or `Busy` when the controller turned it away for load.
async fn exchange(
    endpoint: &quinn::Endpoint,
    params: &EnrollParams,
    csr_der: &[u8],
) -> Result<Result<EnrollResponse, Busy>, AgentError> {
    let cfg = tls::enroll_config(params.token.ca_sha256).map_err(AgentError::Other)?;
    let conn = tokio::time::timeout(ENROLL_TIMEOUT, async {
        endpoint
            .connect_with(cfg, params.addr, CONTROLLER_SERVER_NAME)
            .map_err(|e| AgentError::Other(e.into()))?
            .await
            .map_err(|e| AgentError::Connect(params.controller.clone(), e))
    })
    .await
    .map_err(|_| AgentError::Timeout("enrollment"))??;
    let run = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = EnrollRequest {
            version: PROTOCOL_VERSION,
            token_id: params.token.id.clone(),
            token_secret: params.token.secret.clone(),
            csr_der: csr_der.to_vec(),
            name: params.name.clone(),
            labels: params.labels.clone(),
            facts: params.facts.clone(),
        };
        proto::write_message(&mut send, &req).await?;
        let _ = send.finish();
        let resp: EnrollResponse = proto::read_message(&mut recv, proto::DEFAULT_MAX_FRAME).await?;
        Ok::<_, anyhow::Error>(resp)
    };
    let outcome = tokio::time::timeout(ENROLL_TIMEOUT, run)
        .await
        .map_err(|_| AgentError::Timeout("enrollment"))?;
    match outcome {
        Ok(EnrollResponse::Refused(r))
            if r.code == RefusalCode::Internal && r.message.starts_with("controller busy") =>
        {
            conn.close(proto::close::NORMAL.into(), b"busy");
            Ok(Err(Busy(r.message)))
        }
        Ok(resp) => {
            conn.close(proto::close::NORMAL.into(), b"enrolled");
            Ok(Ok(resp))
        }
        Err(e) => match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(a))
                if a.error_code == proto::close::BUSY.into() =>
            {
                Ok(Err(Busy(String::from_utf8_lossy(&a.reason).into_owned())))
            }
            Some(reason) => Err(AgentError::Closed(reason.to_string())),
            None => Err(match e.downcast::<proto::FrameError>() {
                Ok(f) => AgentError::Frame(f),
                Err(e) => AgentError::Other(e),
            }),
        },
    }
}
