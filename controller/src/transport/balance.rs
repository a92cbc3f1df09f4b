//! Spreading agent sessions over the replicas (the `session-balance` task, leader scope).
//!
//! An agent stays on the replica it reached. After a replica restarts, or when one is added,
//! that replica would hold no session while the others carry the whole fleet, and the next
//! kill of a busy one would send all of its agents elsewhere at once. So every
//! `[ha] balance_interval` the leader counts the sessions each live replica holds (its own,
//! and those relayed to it) and, where one holds more than its share plus 5%, closes some of
//! them with [`close::MOVE`] naming a replica under its share; the agent dials that replica at
//! once (protocol 1.11; an older agent is never asked).
//!
//! Bounded so that balancing never becomes a storm: a pass moves at most 5% of the fleet (at
//! least one session), never a session younger than the interval, and nothing while more
//! than 10% of the sessions are that young (the fleet is still reconnecting after a failover).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nebula_protocol::close;
use serde_json::json;
use tracing::info;
use uuid::Uuid;

use crate::ControlPlane;

/// The first protocol minor whose agents understand [`close::MOVE`].
const MOVE_MINOR: u32 = 11;

/// What the plan needs to know of one live session.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub node: Uuid,
    pub generation: u64,
    /// The replica holding the agent's connection.
    pub replica: String,
    pub age: Duration,
    /// The agent understands a move.
    pub movable: bool,
}

/// One session to close with a move to `to` (a replica's QUIC address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Move {
    pub node: Uuid,
    pub generation: u64,
    pub from: String,
    pub to: String,
}

/// The moves that bring every live replica (id, QUIC address) near its share of `sessions`.
pub(crate) fn plan(
    sessions: &[Held],
    replicas: &[(String, String)],
    min_age: Duration,
) -> Vec<Move> {
    let total = sessions.len();
    if replicas.len() < 2 || total == 0 {
        return Vec::new();
    }
    let young = sessions.iter().filter(|s| s.age < min_age).count();
    if young * 10 > total {
        return Vec::new();
    }
    let share = total.div_ceil(replicas.len());
    let slack = share / 20;
    let cap = (total / 20).max(1);
    let mut held: HashMap<&str, Vec<&Held>> = HashMap::new();
    for s in sessions {
        held.entry(s.replica.as_str()).or_default().push(s);
    }
    // Replicas under their share: how many each may take.
    let mut room: Vec<(usize, &str)> = replicas
        .iter()
        .map(|(id, addr)| {
            let n = held.get(id.as_str()).map_or(0, Vec::len);
            (share.saturating_sub(n), addr.as_str())
        })
        .collect();
    // Replicas over their share (plus the slack): how many they hold, and the sessions that
    // may move, the longest-held last (taken first: a session that just moved stays put).
    let mut over: Vec<(usize, &str, Vec<&Held>)> = replicas
        .iter()
        .filter_map(|(id, _)| {
            let list = held.remove(id.as_str())?;
            (list.len() > share + slack).then(|| {
                let mut movable: Vec<&Held> = list
                    .iter()
                    .copied()
                    .filter(|s| s.movable && s.age >= min_age)
                    .collect();
                movable.sort_by(|a, b| a.age.cmp(&b.age).then(b.node.cmp(&a.node)));
                (list.len(), id.as_str(), movable)
            })
        })
        .collect();
    let mut moves = Vec::new();
    // One at a time from the fullest replica to the emptiest, until balanced or the cap.
    while moves.len() < cap {
        let Some(from) = over
            .iter_mut()
            .filter(|(n, _, movable)| *n > share && !movable.is_empty())
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
        else {
            break;
        };
        let Some(to) = room
            .iter_mut()
            .filter(|(r, _)| *r > 0)
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
        else {
            break;
        };
        let Some(s) = from.2.pop() else { break };
        from.0 -= 1;
        to.0 -= 1;
        moves.push(Move {
            node: s.node,
            generation: s.generation,
            from: from.1.to_owned(),
            to: to.1.to_owned(),
        });
    }
    moves
}

/// One pass: plan from the live sessions and the replicas seen within a lease, then close the
/// sessions to move.
pub(crate) async fn pass(cp: &ControlPlane) -> anyhow::Result<serde_json::Value> {
    if !cp.ha.replicated() {
        return Ok(json!({ "moved": 0 }));
    }
    let window = i64::try_from(cp.config.ha.lease_ttl.as_millis()).unwrap_or(6_000);
    let replicas: Vec<(String, String)> = cp
        .store
        .live_replicas(window)
        .await?
        .into_iter()
        .map(|r| (r.id, r.quic_addr))
        .collect();
    let now = SystemTime::now();
    let sessions: Vec<Held> = cp
        .registry
        .sessions()
        .into_iter()
        .map(|(node, s)| Held {
            node,
            generation: s.generation,
            replica: s.relayed_by.unwrap_or_else(|| cp.ha.replica.clone()),
            age: now.duration_since(s.connected_at).unwrap_or_default(),
            movable: s.protocol_minor >= MOVE_MINOR,
        })
        .collect();
    let moves = plan(&sessions, &replicas, cp.config.ha.balance_interval);
    let mut moved = 0u64;
    for m in &moves {
        if cp
            .registry
            .close_if(m.node, m.generation, close::MOVE, &m.to)
        {
            moved += 1;
        }
    }
    if moved > 0 {
        cp.metrics.sessions_moved.inc_by(moved);
        info!(
            moved,
            sessions = sessions.len(),
            replicas = replicas.len(),
            "moved agent sessions to replicas holding fewer than their share"
        );
    }
    Ok(json!({ "moved": moved, "sessions": sessions.len(), "replicas": replicas.len() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(30);

    fn replicas(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("r{i}"), format!("10.0.0.{i}:7443")))
            .collect()
    }

    fn held(counts: &[usize], age: Duration) -> Vec<Held> {
        let mut out = Vec::new();
        for (i, n) in counts.iter().enumerate() {
            for _ in 0..*n {
                out.push(Held {
                    node: Uuid::new_v4(),
                    generation: out.len() as u64,
                    replica: format!("r{i}"),
                    age,
                    movable: true,
                });
            }
        }
        out
    }

    fn after(sessions: &[Held], moves: &[Move], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for s in sessions {
            let at = moves
                .iter()
                .find(|m| m.node == s.node)
                .map(|m| m.to.clone())
                .map_or(s.replica.clone(), |to| {
                    format!(
                        "r{}",
                        to.trim_end_matches(":7443").rsplit('.').next().unwrap()
                    )
                });
            counts[at[1..].parse::<usize>().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn three_agents_on_one_replica_spread_one_per_pass() {
        let s = held(&[3, 0, 0], MIN * 2);
        let moves = plan(&s, &replicas(3), MIN);
        // At most 5% of the fleet, at least one.
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].from, "r0");
        let counts = after(&s, &moves, 3);
        assert_eq!(counts.iter().sum::<usize>(), 3);
        assert_eq!(counts[0], 2);
        // Next pass, once the moved session is old enough: one each.
        let s = held(&counts, MIN * 2);
        let moves = plan(&s, &replicas(3), MIN);
        assert_eq!(after(&s, &moves, 3), vec![1, 1, 1]);
        // Balanced: nothing moves.
        let s = held(&[1, 1, 1], MIN * 2);
        assert!(plan(&s, &replicas(3), MIN).is_empty());
    }

    #[test]
    fn a_restarted_replica_fills_at_five_percent_a_pass_and_near_balance_is_left_alone() {
        let s = held(&[5_000, 5_000, 0], MIN * 2);
        let moves = plan(&s, &replicas(3), MIN);
        assert_eq!(moves.len(), 500, "5% of 10,000");
        assert!(moves.iter().all(|m| m.to == "10.0.0.2:7443"));
        let counts = after(&s, &moves, 3);
        assert_eq!(counts, vec![4_750, 4_750, 500]);
        // Within 5% of the share: left as it is.
        let s = held(&[3_400, 3_300, 3_300], MIN * 2);
        assert!(plan(&s, &replicas(3), MIN).is_empty());
    }

    #[test]
    fn nothing_moves_while_the_fleet_reconnects_or_with_one_replica() {
        // More than 10% of the sessions younger than the interval: a failover in progress.
        let mut s = held(&[80, 0, 0], MIN * 2);
        s.extend(held(&[0, 20, 0], Duration::from_secs(1)));
        assert!(plan(&s, &replicas(3), MIN).is_empty());
        assert!(plan(&held(&[10], MIN * 2), &replicas(1), MIN).is_empty());
        assert!(plan(&[], &replicas(3), MIN).is_empty());
    }

    #[test]
    fn agents_before_1_11_and_a_dead_replicas_sessions_are_not_moved() {
        let mut s = held(&[4, 0], MIN * 2);
        for h in &mut s {
            h.movable = false;
        }
        assert!(plan(&s, &replicas(2), MIN).is_empty(), "agents before 1.11");
        // Sessions of a dead replica (not live) are not counted as a place to go.
        let s = held(&[0, 0, 6], MIN * 2);
        let moves = plan(&s, &replicas(2), MIN);
        assert!(moves.is_empty(), "{moves:?}");
    }
}
