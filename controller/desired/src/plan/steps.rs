//! What to do on one node: compare the containers a service has there with what placement
//! wants, and say create, update, repair, remove, wait or refused. Orphans (containers of
//! services the map no longer declares) are removed the same way.

use std::collections::{BTreeMap, BTreeSet};

use nebula_protocol::deploy::{HostAccess, SecretFile};

use super::{
    diff, removal_key, Action, Desired, DesiredService, Observed, ObservedContainer, ObservedNode,
    RevisionSpec, Waiting,
};

pub(super) const IN_PROGRESS: &str = "a deploy is in progress";

/// The outcome for one service on one node.
pub(super) enum Step {
    /// Converged: nothing to do.
    Done,
    Act(Action),
    Wait(Waiting),
    /// Not sent: the node's agent would refuse it.
    Refused(Waiting),
}

/// One service on one node, where placement wants `want` replicas.
pub(super) struct NodeWork<'a> {
    pub name: &'a str,
    pub svc: &'a DesiredService,
    pub host: &'a HostAccess,
    pub files: &'a [SecretFile],
    pub node: &'a ObservedNode,
    pub want: u32,
    /// Services this one waits for (the dependency gate).
    pub after: &'a [String],
}

impl NodeWork<'_> {
    /// Decide, given the service's containers on the node and what its agent would refuse.
    pub fn step<'c>(
        &self,
        here: impl Iterator<Item = &'c ObservedContainer>,
        observed: &Observed,
        refusal: impl FnOnce() -> Option<String>,
    ) -> Step {
        let (name, svc, node, want) = (self.name, self.svc, self.node, self.want);
        let mut current = 0usize;
        let mut current_running = 0usize;
        let mut all = 0usize;
        let mut old: BTreeSet<String> = BTreeSet::new();
        for c in here {
            all += 1;
            if c.revision == svc.revision {
                current += 1;
                current_running += usize::from(c.running);
            } else {
                old.insert(c.revision.clone());
            }
        }
        if old.is_empty() && current == want as usize && current_running == current {
            return Step::Done;
        }
        let wait = |reason: String| Waiting {
            service: name.to_owned(),
            node: Some(node.name.clone()),
            reason,
        };
        if observed
            .in_flight
            .contains(&(name.to_owned(), node.name.clone()))
        {
            return Step::Wait(wait(IN_PROGRESS.into()));
        }
        if !node.online {
            return Step::Wait(wait("the node is offline".into()));
        }
        if want == 0 {
            if let Some(why) = observed
                .blocked
                .get(&(name.to_owned(), removal_key(&node.name)))
            {
                return Step::Wait(wait(format!(
                    "removing failed and is not retried until the map is applied again: {why}"
                )));
            }
            return Step::Act(Action::Remove {
                service: name.to_owned(),
                node: node.name.clone(),
                node_id: node.id,
                containers: all,
                reason: "placement no longer puts replicas on this node".into(),
            });
        }
        // Not sent: its agent would refuse it (and a rerun of a failed one as well).
        if let Some(reason) = refusal() {
            return Step::Refused(wait(reason));
        }
        if let Some(why) = observed
            .blocked
            .get(&(name.to_owned(), svc.revision.clone()))
        {
            return Step::Wait(wait(format!(
                "revision {} failed and is not retried until the map is applied again: {why}",
                svc.revision
            )));
        }
        Step::Act(self.action(old, current, current_running, observed))
    }

    /// Create, update or repair, once nothing stands in the way.
    fn action(
        &self,
        old: BTreeSet<String>,
        current: usize,
        current_running: usize,
        observed: &Observed,
    ) -> Action {
        let (name, svc, node, want) = (self.name, self.svc, self.node, self.want);
        if !old.is_empty() {
            let changes = old
                .iter()
                .find_map(|r| observed.revisions.get(r))
                .map(|from| {
                    let to = RevisionSpec {
                        container: svc.spec.clone(),
                        host_access: self.host.clone(),
                        files: self.files.to_vec(),
                    };
                    diff(from, &to)
                })
                .unwrap_or_default();
            return Action::Update {
                service: name.to_owned(),
                node: node.name.clone(),
                node_id: node.id,
                from: old.into_iter().collect(),
                to: svc.revision.clone(),
                replicas: want,
                changes,
                after: self.after.to_vec(),
            };
        }
        if current == 0 {
            return Action::Create {
                service: name.to_owned(),
                node: node.name.clone(),
                node_id: node.id,
                revision: svc.revision.clone(),
                replicas: want,
                after: self.after.to_vec(),
            };
        }
        let reason = if current > want as usize {
            format!("{current} replicas, {want} wanted")
        } else {
            format!("{current_running} of {want} replicas running")
        };
        Action::Repair {
            service: name.to_owned(),
            node: node.name.clone(),
            node_id: node.id,
            revision: svc.revision.clone(),
            replicas: want,
            reason,
            after: self.after.to_vec(),
        }
    }
}

/// Orphans: managed containers of services the map no longer declares, removed unless their
/// node is offline, a deploy is in flight there, the label is not a service name, or removing
/// them failed before.
pub(super) fn orphans(
    desired: &Desired,
    observed: &Observed,
    actions: &mut Vec<Action>,
    waiting: &mut Vec<Waiting>,
) {
    for node in &observed.nodes {
        let mut orphans: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &node.containers {
            if !desired.services.contains_key(&c.service) {
                *orphans.entry(&c.service).or_default() += 1;
            }
        }
        for (service, count) in orphans {
            if observed
                .in_flight
                .contains(&(service.to_owned(), node.name.clone()))
            {
                continue;
            }
            let blocked = observed
                .blocked
                .get(&(service.to_owned(), removal_key(&node.name)));
            let reason = if !node.online {
                Some("the node is offline".to_owned())
            } else if !crate::map::valid_name(service) {
                Some("the `nebula.service` label is not a valid service name; remove these containers by hand".to_owned())
            } else {
                blocked.map(|why| {
                    format!(
                        "removing failed and is not retried until the map is applied again: {why}"
                    )
                })
            };
            if let Some(reason) = reason {
                waiting.push(Waiting {
                    service: service.to_owned(),
                    node: Some(node.name.clone()),
                    reason,
                });
                continue;
            }
            actions.push(Action::Remove {
                service: service.to_owned(),
                node: node.name.clone(),
                node_id: node.id,
                containers: count,
                reason: "the service is no longer declared".into(),
            });
        }
    }
}
