//! The container runtime: one way to reach it (Docker Engine, or Podman's Docker-compatible
//! API), what counts as a container Nebula manages, and an image pull with progress.
//!
//! The socket is, in order: `docker.socket` from the agent's config, `DOCKER_HOST`, Docker's
//! `/var/run/docker.sock`, then Podman's sockets (`$XDG_RUNTIME_DIR/podman/podman.sock` for a
//! rootless Podman, `/run/podman/podman.sock`).

use std::path::PathBuf;

use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

use nebula_protocol::deploy::labels;
use nebula_protocol::Labels;

/// Seconds a request to the runtime may take (a log follow or an exec is a stream and is not
/// bound by it).
const TIMEOUT_SECS: u64 = 120;

/// Where the runtime is: `configured` (`unix:///path` or a path), else
/// the order above; `None` when nothing is found (connecting then reports Docker's default
/// socket as missing).
pub fn socket(configured: Option<&str>) -> Option<String> {
    if let Some(s) = configured {
        return Some(s.to_owned());
    }
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        if !host.is_empty() {
            return Some(host);
        }
    }
    if cfg!(unix) {
        let mut candidates = vec![PathBuf::from("/var/run/docker.sock")];
        if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
            candidates.push(PathBuf::from(run).join("podman/podman.sock"));
        }
        candidates.push(PathBuf::from("/run/podman/podman.sock"));
        return candidates
            .into_iter()
            .find(|p| p.exists())
            .map(|p| format!("unix://{}", p.display()));
    }
    None
}

/// A client for the runtime at `configured` or where [`socket`] finds it (no request made yet).
pub fn connect(configured: Option<&str>) -> Result<Docker, bollard::errors::Error> {
    match socket(configured) {
        Some(s) if s.starts_with("unix://") || s.starts_with('/') => {
            let path = s.trim_start_matches("unix://").to_owned();
            Docker::connect_with_unix(&path, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        // The runtime's API is root on its host: only its local socket is spoken to.
        Some(uri) if uri.contains("://") && !uri.starts_with("npipe://") => {
            Err(bollard::errors::Error::UnsupportedURISchemeError { uri })
        }
        _ => Docker::connect_with_local_defaults(),
    }
}

/// The runtime's name and version as people know it: `docker 27.3.1`, `podman 5.4.2`.
pub fn runtime_name(version: &bollard::models::SystemVersion) -> String {
    let podman = version
        .components
        .iter()
        .flatten()
        .any(|c| c.name.to_ascii_lowercase().contains("podman"));
    let v = version.version.clone().unwrap_or_else(|| "unknown".into());
    if podman {
        format!("podman {v}")
    } else {
        format!("docker {v}")
    }
}

/// True when a container's labels say Nebula manages it for this node (the labels every
/// deploy sets; another node's containers are not this agent's).
pub fn is_managed(container_labels: &Labels, node_id: Option<uuid::Uuid>) -> bool {
    let managed = container_labels.get(labels::MANAGED).map(String::as_str) == Some("true");
    let ours = match node_id {
        Some(id) => container_labels.get(labels::NODE).map(String::as_str) == Some(&id.to_string()),
        None => true,
    };
    managed && ours
}

/// A container looked up by name or id for an action, a log or a shell.
pub struct Found {
    pub inspect: bollard::models::ContainerInspectResponse,
    pub labels: Labels,
    /// Nebula manages it for this node.
    pub managed: bool,
}

/// Look a container up; the error says plainly when there is none.
pub async fn find(
    docker: &Docker,
    name: &str,
    node_id: Option<uuid::Uuid>,
) -> Result<Found, String> {
    let inspect = match docker.inspect_container(name, None).await {
        Ok(c) => c,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Err(format!("no container named `{name}` on this node")),
        Err(e) => return Err(format!("inspecting {name}: {e}")),
    };
    let labels: Labels = inspect
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let managed = is_managed(&labels, node_id);
    Ok(Found {
        inspect,
        labels,
        managed,
    })
}

/// Pull `image`, telling `log` each new status line. The error says what to do about it.
pub async fn pull(docker: &Docker, image: &str, mut log: impl FnMut(String)) -> Result<(), String> {
    let (from, tag) = split_image(image);
    let opts = CreateImageOptionsBuilder::default()
        .from_image(from)
        .tag(tag)
        .build();
    let mut pull = docker.create_image(Some(opts), None, None);
    let mut last_status = String::new();
    while let Some(item) = pull.next().await {
        match item {
            Ok(info) => {
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    return Err(pull_error(image, &e));
                }
                if let Some(status) = info.status {
                    if status != last_status {
                        log(format!("pull: {status}"));
                        last_status = status;
                    }
                }
            }
            Err(e) => return Err(pull_error(image, &e.to_string())),
        }
    }
    docker
        .inspect_image(image)
        .await
        .map(|_| ())
        .map_err(|e| pull_error(image, &e.to_string()))
}

fn pull_error(image: &str, e: &str) -> String {
    format!(
        "pulling image {image} failed (is a registry reachable, or build/load the image on the \
         node?): {e}"
    )
}

/// `repo[:tag]` (a registry port is not a tag).
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !image.contains('@') => (repo, tag),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_means_labelled_for_this_node() {
        let node = uuid::Uuid::from_u128(7);
        let mut l = Labels::new();
        assert!(!is_managed(&l, Some(node)));
        l.insert(labels::MANAGED.into(), "true".into());
        l.insert(labels::NODE.into(), node.to_string());
        assert!(is_managed(&l, Some(node)));
        assert!(!is_managed(&l, Some(uuid::Uuid::from_u128(8))));
        l.insert(labels::MANAGED.into(), "yes".into());
        assert!(!is_managed(&l, Some(node)));
    }

    #[test]
    fn image_tags_are_not_registry_ports() {
        assert_eq!(split_image("busybox"), ("busybox", "latest"));
        assert_eq!(split_image("a/b:1.2"), ("a/b", "1.2"));
        assert_eq!(split_image("reg:5000/b"), ("reg:5000/b", "latest"));
        assert_eq!(split_image("reg:5000/b:v1"), ("reg:5000/b", "v1"));
    }
}
