//! Jobs: the one stream per job between the controller and an agent.
//!
//! The controller opens a bidirectional stream per job and sends [`JobControl::Request`] first
//! ([`JobControl::Fenced`], the request with the leader's term, from a leader of replicas to a
//! 1.10 agent); it may send [`JobControl::Cancel`] later on the same stream. The agent answers with
//! [`JobEvent`]s: `Accepted` (it has the job; `resumed` when the job was already running or done
//! here), `Started` (a concurrency slot was free and the work began), any number of `Log` and
//! `Progress`, and one `Finished`, after which it finishes the stream.
//!
//! Delivery is at least once: after a lost connection or a controller restart the controller
//! sends the same request again (same `id` and `attempt`), and the agent answers from its journal
//! instead of running the work twice. `logs_from` says which log lines the controller already
//! has, so a resumed stream only carries the rest.
//!
//! A newer controller may send a job kind this agent does not know. [`decode_request`] still
//! reads the request's header and reports the unknown kind, so the agent can answer with a clear
//! refusal instead of dropping the stream.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::deploy::{DeployReport, DeploySpec, DeployWithHostAccess, UndeploySpec};
use crate::telemetry::ContainerInfo;
use crate::{FrameError, Labels, NodeFacts};

/// Longest log line carried (longer lines are cut and marked).
pub const MAX_LOG_LINE: usize = 4096;

/// Frames from the controller on a job stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobControl {
    Request(JobRequest),
    Cancel {
        reason: String,
    },
    /// An inference request (1.4): not a stored job; answered with `ai::InferEvent`s.
    Infer(crate::ai::InferRequest),
    /// Follow a container's log (1.6): not a stored job; answered with
    /// `containers::LogEvent`s until the log ends or the controller stops reading.
    Logs(crate::containers::LogsRequest),
    /// An interactive command in a container (1.6): not a stored job; followed by
    /// `containers::ExecInput` frames, answered with `containers::ExecOutput`s.
    Exec(crate::containers::ExecRequest),
    /// A job from a leader of replicas on PostgreSQL (1.10), with the leader's term. The agent
    /// keeps the highest term it has seen and refuses a job from a lower one (a deposed leader
    /// that woke up): it answers `Finished` with [`JobStatus::Refused`] and a reason naming both
    /// terms, runs nothing and keeps nothing in its journal (the real leader may send the same
    /// job).
    Fenced {
        term: u64,
        request: JobRequest,
    },
}

/// One job for one agent. The first four fields are frozen in every major: see [`decode_request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub id: Uuid,
    /// 1 for the first try; a retry on another node (idempotent jobs only) gets the next number.
    pub attempt: u32,
    /// Unix milliseconds by which the work must be over; the agent stops it then.
    pub deadline_unix_ms: Option<i64>,
    /// Log lines with a lower sequence number were already received.
    pub logs_from: u64,
    pub spec: JobSpec,
}

/// What to do. New kinds are added at the end (a minor version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobSpec {
    /// Do nothing and succeed: a round-trip check (`nebula run NODE ping`).
    Noop,
    /// A named operation from the agent's own allow-list.
    Exec(ExecSpec),
    /// An HTTP GET or TCP connect from the agent's host.
    Probe(ProbeSpec),
    /// Containers, system facts, git repositories, agent version.
    Inventory,
    /// Converge one service's containers on this node (create, repair, update, roll back).
    Deploy(Box<DeploySpec>),
    /// Remove one service's managed containers from this node.
    Undeploy(UndeploySpec),
    /// Send a Wake-on-LAN magic packet from this node (a relay on the sleeping host's LAN).
    Wake(WakeSpec),
    /// Pull, download, delete or list models on one of the node's inference backends (1.4).
    Model(crate::ai::ModelSpec),
    /// `Deploy` for a service that asks for host access (privileged, the host's network or PID
    /// namespace, capabilities, devices) (1.5). Only such services are sent this way: an agent
    /// older than 1.5 refuses it as an unknown kind and runs every other deploy as before.
    DeployWithHostAccess(Box<DeployWithHostAccess>),
    /// Start, stop, restart, kill, remove a container or pull its image again (1.6), within
    /// what the node's `docker.control` allows.
    Container(crate::containers::ContainerJob),
    /// List the node's images and volumes, or remove the unused ones named (1.6).
    Storage(crate::containers::StorageAction),
    /// `Deploy` (with any host access) for a service that asks for secret files (1.8): the
    /// files are written into each new container before it starts. Only such services are
    /// sent this way.
    DeployWithFiles(Box<crate::deploy::DeployWithFiles>),
    /// An HTTP request from this host (1.12), answered with [`JobOutput::Http`].
    Http(HttpSpec),
    /// An inference request to one of the node's backends as a stored job (1.12): the same
    /// request as [`JobControl::Infer`], but journalled, with its whole answer (up to
    /// [`MAX_HTTP_BODY`]) as [`JobOutput::Http`].
    Infer(crate::ai::InferRequest),
}

/// Most response bytes an `http` or `infer` job carries back (the rest is cut and marked).
pub const MAX_HTTP_BODY: u32 = 2 << 20;

/// An HTTP request from the agent's host. Redirects are not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSpec {
    /// `GET`, `HEAD`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// An `http://` or `https://` URL.
    pub url: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    /// Response bytes to keep (at most [`MAX_HTTP_BODY`]).
    pub max_bytes: u32,
}

impl HttpSpec {
    pub const METHODS: [&'static str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
}

impl JobSpec {
    /// Number of kinds this build knows (the variant count above).
    pub const KINDS: u32 = 14;

    /// The service a deploy or an undeploy changes (one at a time per service on a node).
    pub fn deploy_service(&self) -> Option<&str> {
        match self {
            JobSpec::Deploy(d) => Some(&d.service),
            JobSpec::DeployWithHostAccess(d) => Some(&d.deploy.service),
            JobSpec::DeployWithFiles(d) => Some(&d.deploy.service),
            JobSpec::Undeploy(u) => Some(&u.service),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Noop => "noop",
            JobSpec::Exec(_) => "exec",
            JobSpec::Probe(_) => "probe",
            JobSpec::Inventory => "inventory",
            JobSpec::Deploy(_) | JobSpec::DeployWithHostAccess(_) | JobSpec::DeployWithFiles(_) => {
                "deploy"
            }
            JobSpec::Undeploy(_) => "undeploy",
            JobSpec::Wake(_) => "wake",
            JobSpec::Model(_) => "model",
            JobSpec::Container(_) => "container",
            JobSpec::Storage(_) => "storage",
            JobSpec::Http(_) => "http",
            JobSpec::Infer(_) => "infer",
        }
    }

    /// True when running the job twice would not matter (reads only).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            JobSpec::Noop
                | JobSpec::Probe(_)
                | JobSpec::Inventory
                | JobSpec::Model(crate::ai::ModelSpec {
                    action: crate::ai::ModelAction::List,
                    ..
                })
                | JobSpec::Storage(crate::containers::StorageAction::List)
        ) || matches!(self, JobSpec::Http(h) if h.method == "GET" || h.method == "HEAD")
    }
}

/// `op` names an allow-listed operation: `git-pull`, `docker-restart`, `systemctl-restart`, a
/// custom command from the agent's config, or `sh` (only where the host allows any command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub op: String,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeSpec {
    Http { url: String, timeout_ms: u32 },
    Tcp { address: String, timeout_ms: u32 },
}

/// A Wake-on-LAN magic packet to send: 6 x 0xff, then the MAC 16 times, over UDP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeSpec {
    pub mac: [u8; 6],
    /// The IPv4 broadcast address of the sleeping host's network (`255.255.255.255`: the
    /// limited broadcast, out of the default interface).
    pub broadcast: String,
    /// UDP port (9 by convention; 7 and 0 are also used).
    pub port: u16,
}

/// Frames from the agent on a job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobEvent {
    /// The agent has the job. `resumed`: it was already running or finished here (a redelivery).
    Accepted {
        resumed: bool,
    },
    /// The work began (a concurrency slot was free).
    Started,
    Log(LogLine),
    Progress {
        percent: f32,
        message: String,
    },
    Finished(JobResult),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines the agent writes about the job itself.
    Agent,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "stdout" => LogStream::Stdout,
            "stderr" => LogStream::Stderr,
            _ => LogStream::Agent,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Per job and attempt, from 0, without gaps.
    pub seq: u64,
    pub at_unix_ms: i64,
    pub stream: LogStream,
    pub line: String,
}

/// How a job ended on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// The agent would not run it (not allow-listed, unknown kind, bad arguments).
    Refused,
    /// The agent restarted while the job ran; it is not run again.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    /// What went wrong, for people.
    pub error: Option<String>,
    pub output: JobOutput,
}

impl JobResult {
    pub fn new(status: JobStatus, error: Option<String>) -> Self {
        JobResult {
            status,
            exit_code: None,
            error,
            output: JobOutput::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobOutput {
    None,
    Probe(ProbeOutput),
    Inventory(Box<InventoryReport>),
    Deploy(DeployReport),
    /// A `storage` job's answer (1.6).
    Storage(crate::containers::StorageReport),
    /// An `http` or `infer` job's answer (1.12).
    Http(HttpOutput),
}

/// What an HTTP request (or a backend) answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpOutput {
    pub status: u16,
    pub content_type: String,
    /// The body's first bytes (at most the request's `max_bytes`). In JSON: the text when it
    /// is UTF-8, else `{"base64": "..."}`.
    #[serde(with = "body_bytes")]
    pub body: Vec<u8>,
    /// The body was longer than what is kept.
    pub truncated: bool,
    pub latency_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeOutput {
    pub ok: bool,
    /// HTTP status for HTTP probes.
    pub status: Option<u16>,
    pub latency_us: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReport {
    pub agent_version: String,
    pub facts: NodeFacts,
    pub containers: Vec<ContainerInfo>,
    /// Container state by id (`running`, `exited`, ...), for the containers above.
    pub container_states: Labels,
    pub repositories: Vec<GitRepository>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitRepository {
    pub path: String,
    /// `None` on a detached head.
    pub branch: Option<String>,
    pub commit: String,
    pub dirty: bool,
}

impl HttpOutput {
    /// The body as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }
}

/// Bytes as bytes on the wire (bincode), and as readable JSON in the controller's store and
/// API: a string when they are UTF-8, else `{"base64": "..."}`.
mod body_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Readable {
        Text(String),
        Base64 { base64: String },
    }

    pub fn serialize<S: Serializer>(bytes: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return serde_bytes::serialize(bytes, s);
        }
        match std::str::from_utf8(bytes) {
            Ok(t) => Readable::Text(t.to_owned()).serialize(s),
            Err(_) => Readable::Base64 {
                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            }
            .serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if !d.is_human_readable() {
            return serde_bytes::deserialize(d);
        }
        match Readable::deserialize(d)? {
            Readable::Text(t) => Ok(t.into_bytes()),
            Readable::Base64 { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl crate::Message for JobControl {
    const NAME: &'static str = "JobControl";
    const VARIANTS: Option<u32> = Some(6);
}

impl crate::Message for JobEvent {
    const NAME: &'static str = "JobEvent";
    const VARIANTS: Option<u32> = Some(5);
}

/// The header of a request: the frozen first fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    pub id: Uuid,
    pub attempt: u32,
    pub deadline_unix_ms: Option<i64>,
    pub logs_from: u64,
}

/// A request frame as read by an agent.
#[derive(Debug)]
pub enum DecodedControl {
    Control(JobControl),
    /// A request for a kind this build does not know (a newer controller).
    UnknownKind {
        header: RequestHeader,
        kind: u32,
        /// The leader's term when it came as [`JobControl::Fenced`].
        term: Option<u64>,
    },
}

/// Decode a controller frame on a job stream, telling an unknown job kind apart from garbage.
pub fn decode_request(payload: &[u8]) -> Result<DecodedControl, FrameError> {
    match crate::decode::<JobControl>(payload) {
        Ok(c) => Ok(DecodedControl::Control(c)),
        Err(e) => {
            // Variant 0 (`Request`), or 5 (`Fenced`) and its term, then the frozen header,
            // then the kind's variant index.
            let cfg = bincode::config::standard().with_limit::<{ crate::DEFAULT_MAX_FRAME }>();
            let (term, used) = match bincode::decode_from_slice::<u32, _>(payload, cfg) {
                Ok((0, used)) => (None, used),
                Ok((5, used)) => {
                    match bincode::decode_from_slice::<u64, _>(&payload[used..], cfg) {
                        Ok((term, more)) => (Some(term), used + more),
                        Err(_) => return Err(e),
                    }
                }
                _ => return Err(e),
            };
            let Ok((header, more)) =
                bincode::serde::decode_from_slice::<RequestHeader, _>(&payload[used..], cfg)
            else {
                return Err(e);
            };
            match bincode::decode_from_slice::<u32, _>(&payload[used + more..], cfg) {
                Ok((kind, _)) if kind >= JobSpec::KINDS => {
                    Ok(DecodedControl::UnknownKind { header, kind, term })
                }
                _ => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP answer's body: bytes on the wire, readable JSON in the store (text when it is
    /// UTF-8, base64 when not), and the same bytes back from either.
    #[test]
    fn an_http_body_is_bytes_on_the_wire_and_readable_in_json() {
        let text = HttpOutput {
            status: 200,
            content_type: "application/json".into(),
            body: br#"{"a":"<b>; rm -rf /"}"#.to_vec(),
            truncated: false,
            latency_us: 9,
        };
        let json = serde_json::to_value(&text).unwrap();
        assert_eq!(json["body"], r#"{"a":"<b>; rm -rf /"}"#);
        assert_eq!(serde_json::from_value::<HttpOutput>(json).unwrap(), text);
        let png = HttpOutput {
            body: vec![0x89, b'P', b'N', b'G', 0xff, 0],
            ..text.clone()
        };
        let json = serde_json::to_value(&png).unwrap();
        assert_eq!(json["body"]["base64"], "iVBOR/8A");
        assert_eq!(serde_json::from_value::<HttpOutput>(json).unwrap(), png);
        let done = JobEvent::Finished(JobResult {
            output: JobOutput::Http(png),
            ..JobResult::new(JobStatus::Succeeded, None)
        });
        let wire = crate::encode(&done).unwrap();
        assert_eq!(crate::decode::<JobEvent>(&wire).unwrap(), done);
        assert!(serde_json::from_value::<HttpOutput>(
            serde_json::json!({"status": 200, "content_type": "", "body": {"base64": "!!"}, "truncated": false, "latency_us": 0})
        )
        .is_err());
    }

    /// A 1.4 agent knew 8 kinds: a deploy with host access is kind 8 to it, which it refuses by
    /// name (with the request's header) instead of dropping the stream.
    #[test]
    fn a_deploy_with_host_access_is_an_unknown_kind_to_a_1_4_agent() {
        use crate::deploy::*;
        const KINDS_IN_1_4: u32 = 8;
        let spec = DeploySpec {
            service: "web".into(),
            revision: "abc".into(),
            node: "n".into(),
            replicas: 1,
            container: ContainerSpec {
                image: "busybox".into(),
                command: None,
                env: Vec::new(),
                ports: Vec::new(),
                volumes: Vec::new(),
                restart: RestartPolicy::No,
                gpus: GpuRequest::None,
                health: None,
            },
            strategy: UpdateStrategy::StartFirst,
            health_timeout_ms: 1000,
        };
        let req = JobRequest {
            id: Uuid::from_u128(9),
            attempt: 1,
            deadline_unix_ms: None,
            logs_from: 0,
            spec: JobSpec::DeployWithHostAccess(Box::new(DeployWithHostAccess {
                deploy: spec,
                host_access: HostAccess {
                    privileged: true,
                    ..Default::default()
                },
            })),
        };
        let bytes = crate::encode(&JobControl::Request(req.clone())).unwrap();
        // What a 1.4 agent's `decode_request` reads after the variant and the frozen header.
        let cfg = bincode::config::standard();
        let (variant, used) = bincode::decode_from_slice::<u32, _>(&bytes, cfg).unwrap();
        let (header, more) =
            bincode::serde::decode_from_slice::<RequestHeader, _>(&bytes[used..], cfg).unwrap();
        let (kind, _) = bincode::decode_from_slice::<u32, _>(&bytes[used + more..], cfg).unwrap();
        assert_eq!((variant, header.id, kind), (0, req.id, KINDS_IN_1_4));
        assert_eq!(req.spec.kind(), "deploy");
        assert!(!req.spec.is_read_only());
        // This build reads it back.
        assert!(matches!(
            decode_request(&bytes).unwrap(),
            DecodedControl::Control(JobControl::Request(r)) if r == req
        ));
    }

    #[test]
    fn unknown_job_kind_is_reported_with_its_header() {
        let req = JobRequest {
            id: Uuid::from_u128(7),
            attempt: 2,
            deadline_unix_ms: Some(1_764_000_000_000),
            logs_from: 3,
            spec: JobSpec::Inventory,
        };
        let mut bytes = crate::encode(&JobControl::Request(req.clone())).unwrap();
        // The kind is the last byte for `Inventory` (a unit variant): make it a future kind.
        *bytes.last_mut().unwrap() = JobSpec::KINDS as u8;
        match decode_request(&bytes).unwrap() {
            DecodedControl::UnknownKind { header, kind, term } => {
                assert_eq!(kind, JobSpec::KINDS);
                assert_eq!(header.id, req.id);
                assert_eq!(header.attempt, 2);
                assert_eq!(header.logs_from, 3);
                assert_eq!(term, None);
            }
            other => panic!("expected an unknown kind, got {other:?}"),
        }
        // The same in a leader's fenced request (1.10): the term is read too.
        let fenced = JobControl::Fenced {
            term: 300,
            request: req.clone(),
        };
        let mut bytes = crate::encode(&fenced).unwrap();
        *bytes.last_mut().unwrap() = JobSpec::KINDS as u8;
        match decode_request(&bytes).unwrap() {
            DecodedControl::UnknownKind { header, kind, term } => {
                assert_eq!((kind, header.id, term), (JobSpec::KINDS, req.id, Some(300)));
            }
            other => panic!("expected an unknown kind, got {other:?}"),
        }
        assert!(matches!(
            decode_request(&crate::encode(&fenced).unwrap()).unwrap(),
            DecodedControl::Control(JobControl::Fenced { term: 300, request }) if request == req
        ));
        // Garbage stays an error.
        assert!(decode_request(&[0xff, 0xff, 0xff]).is_err());
        // A known request decodes normally.
        let ok = crate::encode(&JobControl::Request(req.clone())).unwrap();
        assert!(matches!(
            decode_request(&ok).unwrap(),
            DecodedControl::Control(JobControl::Request(r)) if r == req
        ));
    }
}
