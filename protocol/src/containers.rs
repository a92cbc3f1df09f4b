//! Containers beyond deploys (1.6): actions on any container of a node (a job kind,
//! [`crate::jobs::JobSpec::Container`]), a container's log followed live on a stream of its own
//! ([`crate::jobs::JobControl::Logs`], answered with [`LogEvent`]s), what the agent's `[docker]`
//! config allows ([`DockerPolicySummary`], sent after `Welcome`), and per-container details that
//! the telemetry inventory does not carry ([`ContainerDetails`]: published ports and start time).
//!
//! The agent decides: the controller may preview a refusal from the reported policy, but every
//! request is checked again on the node against its own config.

use serde::{Deserialize, Serialize};

use crate::deploy::PortMapping;
use crate::jobs::LogStream;

/// What may be done to a container, least to most destructive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContainerAction {
    Start,
    /// SIGTERM, then SIGKILL after the container's stop timeout.
    Stop,
    Restart,
    /// SIGKILL at once.
    Kill,
    /// Remove the container (forced: a running one is killed first). Its volumes stay.
    Remove,
    /// Pull the container's image again (the running container is not touched).
    Pull,
}

impl ContainerAction {
    pub const ALL: [ContainerAction; 6] = [
        ContainerAction::Start,
        ContainerAction::Stop,
        ContainerAction::Restart,
        ContainerAction::Kill,
        ContainerAction::Remove,
        ContainerAction::Pull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ContainerAction::Start => "start",
            ContainerAction::Stop => "stop",
            ContainerAction::Restart => "restart",
            ContainerAction::Kill => "kill",
            ContainerAction::Remove => "remove",
            ContainerAction::Pull => "pull",
        }
    }

    /// By name (`rm` is `remove`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rm" => Some(ContainerAction::Remove),
            _ => Self::ALL.into_iter().find(|a| a.as_str() == s),
        }
    }

    /// True when the action changes what runs (everything but a pull).
    pub fn changes_state(self) -> bool {
        !matches!(self, ContainerAction::Pull)
    }
}

/// One action on one container of the node the job runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerJob {
    /// The container's name or id.
    pub container: String,
    pub action: ContainerAction,
}

/// How far an agent lets the controller reach into its containers: none, only those Nebula
/// manages (labelled `nebula.managed=true` for this node), or all.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Also written `off`.
    #[serde(alias = "off")]
    None,
    #[default]
    Managed,
    All,
}

impl Reach {
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::None => "none",
            Reach::Managed => "managed",
            Reach::All => "all",
        }
    }

    /// Whether a container (managed or not) is within reach.
    pub fn allows(self, managed: bool) -> bool {
        match self {
            Reach::None => false,
            Reach::Managed => managed,
            Reach::All => true,
        }
    }
}

/// What the agent's `[docker]` config allows, for the controller to show and to preview
/// refusals with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerPolicySummary {
    /// `docker.control`: actions (start, stop, restart, kill, remove, pull).
    pub control: Reach,
    /// `docker.exec`: interactive shells in containers.
    pub exec: Reach,
    /// `docker.logs`: reading containers' logs.
    pub logs: Reach,
}

impl DockerPolicySummary {
    /// The refusal the agent would give, naming the rule; `None` when it is allowed.
    pub fn refusal(&self, what: PolicyKey, container: &str, managed: bool) -> Option<String> {
        let reach = match what {
            PolicyKey::Control => self.control,
            PolicyKey::Exec => self.exec,
            PolicyKey::Logs => self.logs,
        };
        policy_refusal(what, reach, container, managed)
    }
}

/// The `[docker]` keys of the agent's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKey {
    Control,
    Exec,
    Logs,
}

impl PolicyKey {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKey::Control => "docker.control",
            PolicyKey::Exec => "docker.exec",
            PolicyKey::Logs => "docker.logs",
        }
    }
}

/// What an agent answers when `reach` does not cover `container`: the rule and its value, and
/// what would allow it. The one wording, used by agents and by the controller's preview.
pub fn policy_refusal(
    key: PolicyKey,
    reach: Reach,
    container: &str,
    managed: bool,
) -> Option<String> {
    if reach.allows(managed) {
        return None;
    }
    let key_name = key.as_str();
    Some(match reach {
        Reach::None => format!(
            "refused by the node's {key_name} = \"none\" (agent config): no container may be reached this way"
        ),
        _ => format!(
            "refused by the node's {key_name} = \"managed\" (agent config): `{container}` is not managed by Nebula; {key_name} = \"all\" allows it"
        ),
    })
}

/// Follow (or read) one container's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// The container's name or id.
    pub container: String,
    /// Only lines from this time on (Unix milliseconds).
    pub since_unix_ms: Option<i64>,
    /// Only the last `tail` lines of what is there now (then new ones, when following).
    pub tail: Option<u32>,
    /// Keep the stream open and send new lines as the container writes them.
    pub follow: bool,
}

/// Frames from the agent on a log stream: an empty `Lines` once the request is accepted, then
/// batches of lines, then `End` (the log ended: not following, or the container stopped);
/// or, instead of all that, `Refused` (the node's `docker.logs` rule) or `Error` (no such
/// container, no runtime, too many streams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEvent {
    Lines(Vec<LogEntry>),
    Error { message: String },
    End,
    Refused { message: String },
}

/// Lines sent in one [`LogEvent::Lines`] at most, and their bytes.
pub const LOG_BATCH_LINES: usize = 512;
pub const LOG_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When the container wrote it (the runtime's timestamp), Unix milliseconds.
    pub at_unix_ms: i64,
    /// `Stdout` or `Stderr`.
    pub stream: LogStream,
    /// The line without its end, lossy UTF-8, cut at [`crate::jobs::MAX_LOG_LINE`].
    pub line: String,
}

impl crate::Message for LogEvent {
    const NAME: &'static str = "LogEvent";
    const VARIANTS: Option<u32> = Some(4);
}

/// An interactive command in a container (`docker exec`), on a stream of its own
/// ([`crate::jobs::JobControl::Exec`]). After this request the controller sends
/// [`ExecInput`] frames and the agent answers with [`ExecOutput`] frames: `Started` (or
/// `Refused`/`Error`), output as it comes, and `Exit` last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The container's name or id.
    pub container: String,
    /// Program and arguments (`["sh"]`).
    pub command: Vec<String>,
    /// Allocate a terminal: raw bytes both ways, window size from `rows` and `cols`.
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

/// Frames from the controller on an exec stream, after the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecInput {
    /// Bytes for the command's standard input (keystrokes, with a terminal).
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The client's window changed size.
    Resize { rows: u16, cols: u16 },
    /// No more input (the command sees end of file).
    Eof,
}

/// Frames from the agent on an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecOutput {
    /// The command runs.
    Started,
    /// Standard output (everything, with a terminal).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The command ended with this status (`None`: the runtime did not say).
    Exit {
        code: Option<i64>,
    },
    /// The node's `docker.exec` rule says no.
    Refused {
        message: String,
    },
    Error {
        message: String,
    },
}

impl crate::Message for ExecInput {
    const NAME: &'static str = "ExecInput";
    const VARIANTS: Option<u32> = Some(3);
}

impl crate::Message for ExecOutput {
    const NAME: &'static str = "ExecOutput";
    const VARIANTS: Option<u32> = Some(6);
}

/// Largest data frame either way on an exec stream.
pub const EXEC_CHUNK: usize = 32 * 1024;

/// Images and volumes of a node (1.6): list them with sizes and users, or remove exactly the
/// unused ones named (the list a preview showed, so that what goes is what was shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageAction {
    List,
    Prune {
        /// Image ids.
        images: Vec<String>,
        /// Volume names.
        volumes: Vec<String>,
    },
}

/// What a `storage` job reports: the node's images and volumes (after a prune, as they are
/// then), and what a prune removed or left.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageReport {
    pub images: Vec<ImageInfo>,
    pub volumes: Vec<VolumeInfo>,
    /// Bytes in containers' writable layers.
    pub containers_bytes: u64,
    /// Removed by this prune (image ids, volume names).
    pub removed: Vec<String>,
    /// Named for removal but left, and why (in use since the preview, gone already, ...).
    pub skipped: Vec<(String, String)>,
    pub reclaimed_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
    pub created_unix: i64,
    /// Names of the containers (running or not) made from it.
    pub containers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub driver: String,
    /// `None` when the agent cannot read it (another driver, or no access).
    pub size_bytes: Option<u64>,
    /// Names of the containers (running or not) that mount it.
    pub containers: Vec<String>,
}

/// What the telemetry inventory does not say about its containers, in the inventory's order,
/// tagged with its epoch (sent right after each inventory to a 1.6 controller).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDetails {
    pub epoch: u32,
    pub containers: Vec<ContainerDetail>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDetail {
    /// When the container last started (Unix milliseconds); `None` when it never ran.
    pub started_unix_ms: Option<i64>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
}

/// A container reference as the agent accepts it: a name (`[A-Za-z0-9][A-Za-z0-9_.-]*`) or an
/// id, at most 128 characters.
pub fn valid_container_ref(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_by_name_and_reach_is_ordered() {
        for a in ContainerAction::ALL {
            assert_eq!(ContainerAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(ContainerAction::parse("rm"), Some(ContainerAction::Remove));
        assert_eq!(ContainerAction::parse("explode"), None);
        assert!(Reach::None < Reach::Managed && Reach::Managed < Reach::All);
        assert!(!Reach::None.allows(true));
        assert!(Reach::Managed.allows(true) && !Reach::Managed.allows(false));
        assert!(Reach::All.allows(false));
    }

    #[test]
    fn a_refusal_names_the_rule_and_what_would_allow_it() {
        let p = DockerPolicySummary::default();
        assert_eq!(p.refusal(PolicyKey::Control, "web", true), None);
        let r = p.refusal(PolicyKey::Control, "db", false).unwrap();
        assert!(r.contains("docker.control = \"managed\""), "{r}");
        assert!(
            r.contains("`db`") && r.contains("docker.control = \"all\""),
            "{r}"
        );
        let none = DockerPolicySummary {
            exec: Reach::None,
            ..p
        };
        let r = none.refusal(PolicyKey::Exec, "web", true).unwrap();
        assert!(r.contains("docker.exec = \"none\""), "{r}");
    }

    #[test]
    fn container_refs_are_names_or_ids() {
        for ok in ["web", "web-1", "a.b_c", &"f".repeat(64)] {
            assert!(valid_container_ref(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "a/b", "../x", &"x".repeat(129)] {
            assert!(!valid_container_ref(bad), "{bad}");
        }
    }
}
