//! Wire types and framing between the Nebula controller and its agents.
//!
//! This crate is plain data: serde types, a bincode codec and a length-prefixed frame format. It
//! spawns no tasks and owns no channels; it depends on no async runtime, database, HTTP or Docker
//! crate (the framing helpers are generic over the `futures-io` traits, which quinn's streams
//! implement).
//!
//! # Connections and streams
//!
//! An agent opens one QUIC connection to the controller and picks one of two ALPNs:
//!
//! * [`ALPN_ENROLL`] (`nebula-enroll/1`): no client certificate. One bidirectional stream carries
//!   one [`EnrollRequest`] and one [`EnrollResponse`].
//! * [`ALPN_SESSION`] (`nebula/1`): client certificate required. The first bidirectional stream,
//!   opened by the agent, is the *session*: [`Hello`] then [`ServerHello`], after which either side
//!   may send [`AgentMessage`] / [`ControllerMessage`] frames until one sends `Bye` or the
//!   connection closes.
//!
//! # Frames
//!
//! A frame is a `u32` little-endian payload length followed by the payload, a bincode (serde,
//! standard config) encoding of one message. The length is checked against a limit before any
//! buffer is allocated ([`DEFAULT_MAX_FRAME`], 16 MiB).
//!
//! # Versions
//!
//! [`ProtocolVersion`] is `major.minor`. Peers with the same major are compatible; a newer minor may
//! add enum variants at the end of a message enum, which an older peer reports as
//! [`FrameError::UnknownVariant`] and answers with "unsupported" instead of failing. Different
//! majors are refused at `Hello` with both versions in the message. Two encodings are frozen for
//! every major so that refusal always works: a [`Hello`] frame starts with its `ProtocolVersion`
//! (two varint `u16`s), and [`ServerHello::Refused`] is variant 1 with the [`Refusal`] layout.
//! Golden byte files under `protocol/tests/golden/` pin the encoding of every message.
//!
//! Jobs ride on their own bidirectional streams, opened by the controller: see [`jobs`].

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod ai;
pub mod containers;
pub mod deploy;
pub mod framing;

pub mod time;
pub mod validate;
pub use validate::valid_name;
pub mod jobs;
pub mod monitors;
pub mod release;
pub mod telemetry;

pub use framing::{read_frame, read_message, write_frame, write_message, FrameReader};

/// ALPN of the enrollment endpoint (no client certificate).
pub const ALPN_ENROLL: &[u8] = b"nebula-enroll/1";
/// ALPN of agent sessions (client certificate required).
pub const ALPN_SESSION: &[u8] = b"nebula/1";
/// Default upper bound on one frame's payload.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// The server name agents verify in the controller's certificate. Trust comes from the pinned CA,
/// so the name is fixed rather than taken from the address the agent dials (which may be a NAT
/// address or an IP the certificate cannot know about).
pub const CONTROLLER_SERVER_NAME: &str = "controller.nebula.internal";
/// DNS-name suffix of the SAN that carries a node's id in its client certificate:
/// `<node-id>.node.nebula.internal`.
pub const NODE_SAN_SUFFIX: &str = ".node.nebula.internal";

/// The protocol version spoken by this build.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 12,
};

/// `major.minor`. Same major: compatible. Different major: refused at `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    /// The compatibility rule: equal majors talk; minors only add variants and fields at the end.
    pub fn is_compatible_with(self, other: ProtocolVersion) -> bool {
        self.major == other.major
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// QUIC application close codes used by both sides.
pub mod close {
    /// Orderly shutdown (`Bye`).
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol (garbage, oversized frame, wrong first message).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The session was refused; the reason is the close reason text.
    pub const REFUSED: u32 = 2;
    /// A newer connection from the same node replaced this one.
    pub const REPLACED: u32 = 3;
    /// The node was removed and its certificates revoked.
    pub const REVOKED: u32 = 4;
    /// The controller is shutting down; reconnect later.
    pub const SHUTDOWN: u32 = 5;
    /// The controller is busy (too many connections, or too many from this address); the
    /// reason says which. Try again later.
    pub const BUSY: u32 = 6;
    /// This replica does not lead and does not hold sessions (1.9): try another replica at
    /// once (the reason names the leader's address when known).
    pub const NOT_LEADER: u32 = 7;
    /// The replicas spread their agents' sessions (1.11): reconnect at once to the replica
    /// whose QUIC address (`HOST:PORT`) is the reason. An older agent reconnects as after any
    /// lost connection.
    pub const MOVE: u32 = 8;

    /// The replica a close names for the agent to dial next: the whole reason of a `MOVE`, the
    /// end of a `NOT_LEADER`'s ("... the leader is at HOST:PORT"). `None` for other codes or a
    /// reason that is not one address.
    pub fn named_address(code: u32, reason: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(reason);
        let at = match code {
            MOVE => text.trim(),
            NOT_LEADER => text.rsplit_once(" at ")?.1.trim(),
            _ => return None,
        };
        (!at.is_empty() && at.len() <= 255 && !at.contains(char::is_whitespace))
            .then(|| at.to_owned())
    }
}

/// Key/value labels on nodes and join tokens.
pub type Labels = BTreeMap<String, String>;

/// Why a request was refused. Codes are stable; messages are for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    VersionMismatch,
    TokenUnknown,
    TokenExpired,
    TokenExhausted,
    TokenRevoked,
    InvalidRequest,
    NameTaken,
    NodeRevoked,
    CertificateRequired,
    Internal,
    Unsupported,
}

impl RefusalCode {
    /// True when retrying the same request cannot succeed (the agent should stop, not back off).
    pub fn is_permanent(self) -> bool {
        !matches!(self, RefusalCode::Internal)
    }
}

/// A refusal with a stable code, a message for people and the refusing side's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
    pub version: ProtocolVersion,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            version: PROTOCOL_VERSION,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// What an agent knows about its host, sent in `Hello` and at enrollment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub hostname: String,
    pub os: String,
    pub os_version: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub labels: Labels,
    /// NVIDIA GPUs found through NVML (empty when none or no driver).
    pub gpus: Vec<telemetry::GpuInfo>,
    /// Container runtime and version, e.g. `docker 27.3.1`; `None` when none is reachable.
    pub container_runtime: Option<String>,
}

/// Enrollment request (ALPN `nebula-enroll/1`): the join token and a CSR for a key that never
/// leaves the agent's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub version: ProtocolVersion,
    pub token_id: String,
    pub token_secret: String,
    /// PKCS#10 certificate signing request, DER.
    pub csr_der: Vec<u8>,
    /// The name the node asks for (defaults to its hostname).
    pub name: String,
    /// Labels the agent asks for; labels on the token are merged in (the token wins).
    pub labels: Labels,
    pub facts: NodeFacts,
}

/// The controller's answer to an [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled(Enrolled),
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub node_id: Uuid,
    pub name: String,
    pub labels: Labels,
    /// The node's client certificate, DER, its SAN carrying the node id.
    pub cert_der: Vec<u8>,
    /// The controller's CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// Session settings, so that the very first session already uses the right keep-alive.
    pub settings: SessionSettings,
}

/// First frame of a session. Its first field must stay `version` in every major.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: ProtocolVersion,
    pub agent_version: String,
    pub facts: NodeFacts,
}

/// The controller's answer to `Hello`. `Refused` must stay variant 1 in every major.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerHello {
    Welcome(Welcome),
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Taken from the verified client certificate, never from the agent.
    pub node_id: Uuid,
    pub name: String,
    pub labels: Labels,
    pub controller_version: ProtocolVersion,
    pub settings: SessionSettings,
}

/// Settings the controller hands to an agent; may change during a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSettings {
    pub telemetry_interval_ms: u32,
    pub keep_alive_ms: u32,
    pub idle_timeout_ms: u32,
}

/// Session-stream messages from the agent after `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Ask for a fresh certificate for a new key (CSR, DER).
    RenewCertificate { csr_der: Vec<u8> },
    /// The agent is going away on purpose.
    Bye { reason: String },
    /// Answer to a controller message this agent does not understand (a newer minor).
    Unsupported { variant: u32 },
    /// The names and other slow-changing facts that telemetry samples refer to by position.
    /// Sent at session start and whenever it changes, always before samples that use it.
    TelemetryInventory(telemetry::TelemetryInventory),
    /// The node's inference backends and their models (1.4): at session start and on change.
    AiInventory(ai::AiInventory),
    /// The certificate from the last `CertificateRenewed` is saved and will be used from the
    /// next connection on (1.5): the controller revokes the node's older certificates, so a
    /// stolen old key stops working at renewal rather than at expiry.
    CertificateSaved,
    /// What this host's deploy policy (the agent config's `[deploy]`) allows (1.5): sent after
    /// `Welcome`, before the telemetry inventory, so that plans can show what the node would
    /// refuse before anything is sent to it.
    DeployPolicy(deploy::DeployPolicySummary),
    /// What this host's `[docker]` config allows for its containers (1.6): sent after the
    /// deploy policy.
    DockerPolicy(containers::DockerPolicySummary),
    /// Published ports and start times of the containers in the telemetry inventory with the
    /// same epoch (1.6): sent right after each inventory.
    ContainerDetails(containers::ContainerDetails),
    /// Results of the node's monitors (1.7), in batches of at most
    /// [`monitors::MAX_RESULTS_PER_BATCH`].
    MonitorResults(Vec<monitors::MonitorResult>),
}

/// Session-stream messages from the controller after `ServerHello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerMessage {
    CertificateRenewed {
        cert_der: Vec<u8>,
    },
    RenewalRefused(Refusal),
    SettingsChanged(SessionSettings),
    Bye {
        reason: String,
    },
    Unsupported {
        variant: u32,
    },
    /// The agent builds the controller serves (1.3): sent after `Welcome` and whenever they
    /// change. An agent that opted in updates itself from the one for its platform.
    AgentReleases(Vec<release::AgentRelease>),
    /// Every monitor this node runs (1.7): sent after `Welcome` and whenever the set changes;
    /// it replaces the previous set.
    Monitors(Vec<monitors::MonitorSpec>),
    /// The QUIC addresses (`HOST:PORT`) of every controller replica (1.9): sent after
    /// `Welcome` and whenever the list changes. The agent keeps it and, when its connection is
    /// lost, tries the others in turn.
    Replicas(Vec<String>),
    /// The term of the leader this session is with (1.10): sent after `Welcome` by a replica on
    /// PostgreSQL. The agent keeps the highest term it has seen (across restarts); a session
    /// with a lower one is a deposed leader's, and the agent leaves it for another replica.
    Term(u64),
}

/// A type that travels as one frame.
pub trait Message: Serialize + DeserializeOwned {
    /// Name used in errors and logs.
    const NAME: &'static str;
    /// For enum messages, the number of variants this build knows; a frame whose variant index is
    /// at or past it decodes to [`FrameError::UnknownVariant`] (a newer minor), not garbage.
    const VARIANTS: Option<u32> = None;
}

macro_rules! message {
    ($ty:ty, $name:literal) => {
        impl Message for $ty {
            const NAME: &'static str = $name;
        }
    };
    ($ty:ty, $name:literal, $variants:literal) => {
        impl Message for $ty {
            const NAME: &'static str = $name;
            const VARIANTS: Option<u32> = Some($variants);
        }
    };
}

message!(EnrollRequest, "EnrollRequest");
message!(EnrollResponse, "EnrollResponse", 2);
message!(Hello, "Hello");
message!(ServerHello, "ServerHello", 2);
message!(AgentMessage, "AgentMessage", 10);
message!(ControllerMessage, "ControllerMessage", 9);

/// Errors reading or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly at a frame boundary.
    #[error("stream closed")]
    Closed,
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {message} frame")]
    Decode {
        message: &'static str,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("{message} variant {index} is not known to this version ({known} known)")]
    UnknownVariant {
        message: &'static str,
        index: u32,
        known: u32,
    },
    #[error("encoding {message}")]
    Encode {
        message: &'static str,
        #[source]
        source: bincode::error::EncodeError,
    },
    #[error("i/o error on stream")]
    Io(#[from] std::io::Error),
}

/// Standard bincode config with a decode limit: a length field inside a frame can never make the
/// decoder claim more memory than a frame may hold, whatever the bytes say.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DEFAULT_MAX_FRAME>,
> {
    bincode::config::standard().with_limit::<DEFAULT_MAX_FRAME>()
}

/// Encode a message into its payload (no length prefix).
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|source| FrameError::Encode {
        message: M::NAME,
        source,
    })
}

/// Encode a message as a whole frame (length prefix + payload).
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Append a message as a whole frame to `out`, so that several frames can go out in one write.
/// A payload over [`DEFAULT_MAX_FRAME`] is refused. On error `out` is left as it was.
pub fn encode_frame_into<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let written = bincode::serde::encode_into_std_write(msg, out, config()).map_err(|source| {
        FrameError::Encode {
            message: M::NAME,
            source,
        }
    });
    // No reader takes a frame over the limit: refuse it here, with the reason, rather than
    // have the peer drop the stream.
    let len = written.and_then(|n| match u32::try_from(n) {
        Ok(len) if n <= DEFAULT_MAX_FRAME => Ok(len),
        _ => Err(FrameError::TooLarge {
            len: n,
            max: DEFAULT_MAX_FRAME,
        }),
    });
    match len {
        Ok(len) => {
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

/// Decode one message from a payload. Trailing bytes are rejected, except for the frozen
/// version prefix decoders ([`peek_version`]).
pub fn decode<M: Message>(payload: &[u8]) -> Result<M, FrameError> {
    if let Some(known) = M::VARIANTS {
        let (index, _): (u32, usize) =
            bincode::decode_from_slice(payload, config()).map_err(|source| FrameError::Decode {
                message: M::NAME,
                source,
            })?;
        if index >= known {
            return Err(FrameError::UnknownVariant {
                message: M::NAME,
                index,
                known,
            });
        }
    }
    let (msg, used): (M, usize) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|source| {
            FrameError::Decode {
                message: M::NAME,
                source,
            }
        })?;
    if used != payload.len() {
        return Err(FrameError::Decode {
            message: M::NAME,
            source: bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes",
                payload.len() - used
            )),
        });
    }
    Ok(msg)
}

/// Read the protocol version at the start of a `Hello` payload without decoding the rest, so a
/// peer of another major (whose `Hello` may differ after the version) can be refused clearly.
pub fn peek_version(payload: &[u8]) -> Result<ProtocolVersion, FrameError> {
    let (v, _): (ProtocolVersion, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|source| FrameError::Decode {
            message: "Hello",
            source,
        })?;
    Ok(v)
}

/// A join token as people paste it: `nebula-join:<id>.<secret>@<sha256 of the controller CA, hex>`.
/// The id and secret authenticate the agent to the controller; the CA hash pins the controller
/// on first contact.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_sha256: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a join token string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    #[error("a join token starts with `nebula-join:`")]
    Prefix,
    #[error("a join token reads `nebula-join:<id>.<secret>@<ca-sha256>`")]
    Shape,
    #[error("the token id and secret may only hold letters and digits")]
    Charset,
    #[error("the CA pin must be 64 hex digits (a SHA-256)")]
    Pin,
}

impl JoinToken {
    pub const PREFIX: &'static str = "nebula-join:";
}

impl std::str::FromStr for JoinToken {
    type Err = JoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix(Self::PREFIX)
            .ok_or(JoinTokenError::Prefix)?;
        let (cred, pin) = rest.split_once('@').ok_or(JoinTokenError::Shape)?;
        let (id, secret) = cred.split_once('.').ok_or(JoinTokenError::Shape)?;
        if id.is_empty() || secret.is_empty() {
            return Err(JoinTokenError::Shape);
        }
        let alnum = |v: &str| v.bytes().all(|b| b.is_ascii_alphanumeric());
        if !alnum(id) || !alnum(secret) {
            return Err(JoinTokenError::Charset);
        }
        if pin.len() != 64 {
            return Err(JoinTokenError::Pin);
        }
        let mut ca_sha256 = [0u8; 32];
        for (i, chunk) in pin.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| JoinTokenError::Pin)?;
            ca_sha256[i] = u8::from_str_radix(hex, 16).map_err(|_| JoinTokenError::Pin)?;
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256,
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}.{}@", Self::PREFIX, self.id, self.secret)?;
        for b in self.ca_sha256 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn join_token_round_trips_and_rejects_bad_shapes() {
        let t = JoinToken {
            id: "abc123".into(),
            secret: "S3cret".into(),
            ca_sha256: [0xab; 32],
        };
        let s = t.to_string();
        assert_eq!(s, format!("nebula-join:abc123.S3cret@{}", "ab".repeat(32)));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert_eq!("abc".parse::<JoinToken>(), Err(JoinTokenError::Prefix));
        assert_eq!(
            "nebula-join:abc".parse::<JoinToken>(),
            Err(JoinTokenError::Shape)
        );
        assert_eq!(
            format!("nebula-join:a-b.c@{}", "00".repeat(32)).parse::<JoinToken>(),
            Err(JoinTokenError::Charset)
        );
        assert_eq!(
            "nebula-join:a.b@zz".parse::<JoinToken>(),
            Err(JoinTokenError::Pin)
        );
        assert_eq!(
            format!("nebula-join:a.b@{}", "zz".repeat(32)).parse::<JoinToken>(),
            Err(JoinTokenError::Pin)
        );
        assert!(!format!("{t:?}").contains("S3cret"));
    }
}

#[cfg(test)]
mod close_tests {
    use super::close::{named_address, MOVE, NOT_LEADER, SHUTDOWN};

    #[test]
    fn closes_name_the_replica_to_dial_next() {
        assert_eq!(
            named_address(MOVE, b"10.0.0.2:4433").as_deref(),
            Some("10.0.0.2:4433")
        );
        assert_eq!(
            named_address(
                NOT_LEADER,
                b"not the leader: the leader is at c1.example.net:4433"
            )
            .as_deref(),
            Some("c1.example.net:4433")
        );
        assert_eq!(named_address(NOT_LEADER, b"no leader known"), None);
        assert_eq!(named_address(MOVE, b""), None);
        assert_eq!(named_address(MOVE, b"two words"), None);
        assert_eq!(named_address(MOVE, "x".repeat(256).as_bytes()), None);
        assert_eq!(named_address(SHUTDOWN, b"10.0.0.2:4433"), None);
    }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn names_follow_one_rule() {
        for ok in ["a", "web-1", "gpu_box.home", &"x".repeat(63)] {
            assert!(super::valid_name(ok), "{ok}");
        }
        for bad in ["", "-web", ".x", "a b", "web,x=y", "ü", &"x".repeat(64)] {
            assert!(!super::valid_name(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::ai::InferEvent;

    #[test]
    fn frames_appended_to_one_buffer_read_back_in_order() {
        let events = [
            InferEvent::Head {
                status: 200,
                content_type: "application/json".into(),
            },
            InferEvent::Chunk(b"{\"id\":1}".to_vec()),
            InferEvent::End,
        ];
        let mut buf = b"kept".to_vec();
        for e in &events {
            encode_frame_into(e, &mut buf).unwrap();
        }
        assert_eq!(&buf[..4], b"kept");
        // The same bytes as one frame per write.
        let one_by_one: Vec<u8> = events
            .iter()
            .flat_map(|e| encode_frame(e).unwrap())
            .collect();
        assert_eq!(&buf[4..], &one_by_one[..]);
        let mut rest = &buf[4..];
        for e in &events {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            let got: InferEvent = decode(&rest[4..4 + len]).unwrap();
            assert_eq!(&got, e);
            rest = &rest[4 + len..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn a_frame_that_cannot_be_encoded_leaves_the_buffer_as_it_was() {
        // Over the frame limit: refused, nothing half-written.
        let big = InferEvent::Chunk(vec![0; DEFAULT_MAX_FRAME + 1]);
        let mut buf = b"kept".to_vec();
        assert!(encode_frame_into(&big, &mut buf).is_err());
        assert_eq!(buf, b"kept");
    }
}
