//! Joining the fleet: prove a join token over `nebula-enroll/1`, receive a certificate for a key
//! generated here.

use std::net::SocketAddr;
use std::time::Duration;

use nebula_protocol::{
    self as proto, EnrollRequest, EnrollResponse, JoinToken, Labels, NodeFacts,
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

/// Enroll and save the identity in `state`.
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    params: EnrollParams,
    state: &StateDir,
) -> Result<Identity, AgentError> {
    let (key, csr_der) = new_key_and_csr()?;
    let cfg = tls::enroll_config(params.token.ca_sha256).map_err(AgentError::Other)?;
    let run = async {
        let conn = endpoint
            .connect_with(cfg, params.addr, CONTROLLER_SERVER_NAME)
            .map_err(|e| AgentError::Other(e.into()))?
            .await
            .map_err(|e| AgentError::Connect(params.controller.clone(), e))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| AgentError::Other(e.into()))?;
        let req = EnrollRequest {
            version: PROTOCOL_VERSION,
            token_id: params.token.id.clone(),
            token_secret: params.token.secret.clone(),
            csr_der,
            name: params.name.clone(),
            labels: params.labels.clone(),
            facts: params.facts.clone(),
        };
        proto::write_message(&mut send, &req).await?;
        let _ = send.finish();
        let resp: EnrollResponse = proto::read_message(&mut recv, proto::DEFAULT_MAX_FRAME)
            .await
            .map_err(|e| match conn.close_reason() {
                Some(reason) => AgentError::Closed(reason.to_string()),
                None => AgentError::Frame(e),
            })?;
        conn.close(proto::close::NORMAL.into(), b"enrolled");
        Ok::<_, AgentError>(resp)
    };
    let resp = tokio::time::timeout(ENROLL_TIMEOUT, run)
        .await
        .map_err(|_| AgentError::Timeout("enrollment"))??;
    match resp {
        EnrollResponse::Enrolled(e) => {
            let st = AgentState {
                controller: params.controller,
                node_id: e.node_id,
                name: e.name.clone(),
                settings: Some(e.settings.clone()),
            };
            state.save(&st, &key, &e.cert_der, &e.ca_der)?;
            info!(node = %e.node_id, name = %e.name, labels = ?e.labels, "enrolled");
            Ok(state.load()?)
        }
        EnrollResponse::Refused(r) => Err(AgentError::Refused(r)),
    }
}
