//! Health monitors (1.7): checks the controller assigns to a node and the agent runs on a
//! schedule of its own, without a job per run. The controller sends a node its whole set
//! ([`crate::ControllerMessage::Monitors`]) at session start and whenever it changes; the
//! agent replaces what it runs and reports results in batches
//! ([`crate::AgentMessage::MonitorResults`]).

use serde::{Deserialize, Serialize};

/// The most monitors one node runs.
pub const MAX_MONITORS_PER_NODE: usize = 1000;
/// The shortest interval between two runs of a check.
pub const MIN_INTERVAL_MS: u32 = 5_000;
/// The longest a check may take.
pub const MAX_TIMEOUT_MS: u32 = 60_000;
/// The most results in one batch.
pub const MAX_RESULTS_PER_BATCH: usize = 512;
/// Error texts are cut to this many bytes.
pub const MAX_ERROR_BYTES: usize = 300;

/// One check a node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorSpec {
    /// The monitor's name (unique in the fleet).
    pub name: String,
    pub check: MonitorCheck,
    pub interval_ms: u32,
    pub timeout_ms: u32,
}

/// What is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorCheck {
    /// A GET: up when the status is one of `statuses` (empty: 200-399) and the body contains
    /// `body_contains` when given. For `https://`, the certificate's expiry is reported;
    /// `insecure` accepts a certificate no root vouches for (a home LAN's self-signed one).
    Http {
        url: String,
        statuses: Vec<u16>,
        body_contains: Option<String>,
        insecure: bool,
    },
    /// A TCP connect to `host:port`.
    Tcp { address: String },
    /// An ICMP echo where this host permits it (unprivileged ping sockets, or raw sockets with
    /// the capability), else a TCP connect to `tcp_port` (the result says which was used).
    Ping { host: String, tcp_port: u16 },
    /// A DNS query over UDP to `server` (default: the host's first resolver): up when the
    /// answer is NOERROR with at least one record of the type, and holds `expect` when given.
    Dns {
        name: String,
        record: DnsRecord,
        server: Option<String>,
        expect: Option<String>,
    },
    /// The node's container runtime answers its API.
    Docker,
}

impl MonitorCheck {
    pub fn kind(&self) -> &'static str {
        match self {
            MonitorCheck::Http { .. } => "http",
            MonitorCheck::Tcp { .. } => "tcp",
            MonitorCheck::Ping { .. } => "ping",
            MonitorCheck::Dns { .. } => "dns",
            MonitorCheck::Docker => "docker",
        }
    }

    /// What is checked, in a few words (`https://x/health`, `db:5432`, `A example.org`).
    pub fn target(&self) -> String {
        match self {
            MonitorCheck::Http { url, .. } => url.clone(),
            MonitorCheck::Tcp { address } => address.clone(),
            MonitorCheck::Ping { host, .. } => host.clone(),
            MonitorCheck::Dns {
                name,
                record,
                server,
                ..
            } => match server {
                Some(s) => format!("{} {name} @{s}", record.as_str()),
                None => format!("{} {name}", record.as_str()),
            },
            MonitorCheck::Docker => "container runtime".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsRecord {
    A,
    Aaaa,
}

impl DnsRecord {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsRecord::A => "A",
            DnsRecord::Aaaa => "AAAA",
        }
    }
}

/// One run of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorResult {
    pub name: String,
    /// When the run started (Unix milliseconds).
    pub at_ms: i64,
    pub up: bool,
    pub latency_us: u64,
    /// HTTP status, when one came back.
    pub status: Option<u16>,
    /// When the server's certificate expires (Unix milliseconds), for HTTPS.
    pub cert_expires_ms: Option<i64>,
    /// How a ping went out (`icmp` or `tcp`).
    pub method: Option<String>,
    /// Why it is down.
    pub error: Option<String>,
}
