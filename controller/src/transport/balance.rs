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
//! least one session), never a session younger than the interval or one with a followed log,
//! a terminal or an inference stream open (a busy session), and nothing while more
//! than 10% of the sessions (more than one, in a fleet under 20) are that young: the fleet is
//! still reconnecting after a failover.
//! A replica the moved agents did not reach (a wrong `public_address`, a replica that turns
//! agents away) gets none for 2, 4, ... 64 passes before it is tried again.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
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
    /// The agent understands a move, and nothing long-lived is open on its session.
    pub movable: bool,
}

/// A live replica: its id, QUIC address, and whether agents may be moved to it.
#[derive(Debug, Clone)]
pub(crate) struct Replica {
    pub id: String,
    pub addr: String,
    pub takes: bool,
}

/// One session to close with a move to `to` (a replica's QUIC address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Move {
    pub node: Uuid,
    pub generation: u64,
    pub from: String,
    /// The target's QUIC address (the close reason) and id.
    pub to: String,
    pub to_id: String,
}

/// The moves that bring every live replica near its share of the sessions it and the other
/// live replicas hold (sessions of a replica not in `replicas` are left out: it is gone).
pub(crate) fn plan(sessions: &[Held], replicas: &[Replica], min_age: Duration) -> Vec<Move> {
    let live: HashSet<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
    let sessions: Vec<&Held> = sessions
        .iter()
        .filter(|s| live.contains(s.replica.as_str()))
        .collect();
    let total = sessions.len();
    if replicas.len() < 2 || total == 0 {
        return Vec::new();
    }
    let young = sessions.iter().filter(|s| s.age < min_age).count();
    if young > (total / 10).max(1) {
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
    let mut room: Vec<(usize, &str, &str)> = replicas
        .iter()
        .filter(|r| r.takes)
        .map(|r| {
            let n = held.get(r.id.as_str()).map_or(0, Vec::len);
            (share.saturating_sub(n), r.addr.as_str(), r.id.as_str())
        })
        .collect();
    // Replicas over their share (plus the slack): how many they hold, and the sessions that
    // may move, the longest-held last (taken first: a session that just moved stays put).
    let mut over: Vec<(usize, &str, Vec<&Held>)> = replicas
        .iter()
        .filter_map(|Replica { id, .. }| {
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
            .filter(|(r, _, _)| *r > 0)
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
            to_id: to.2.to_owned(),
        });
    }
    moves
}

/// What the task remembers between passes: the moves sent to each replica, and the replicas
/// the moved agents did not reach.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    memory: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    /// The nodes moved to each replica in the last pass.
    sent: HashMap<String, Vec<Uuid>>,
    /// Per replica the moved agents did not reach: failures in a row, passes left without
    /// moves to it.
    shunned: HashMap<String, (u32, u32)>,
}

impl Memory {
    /// Judge the last pass's moves by where those nodes' sessions are now (`at`; a node not
    /// back yet is not judged): when fewer than half reached their replica, it gets none for
    /// 2, 4, ... 64 passes. The replicas to send none to in this pass, and those shunned just
    /// now.
    fn review(
        &mut self,
        at: &HashMap<Uuid, &str>,
        live: &HashSet<String>,
    ) -> (HashSet<String>, Vec<String>) {
        self.shunned.retain(|id, _| live.contains(id));
        let mut new = Vec::new();
        for (id, nodes) in std::mem::take(&mut self.sent) {
            let back: Vec<bool> = nodes
                .iter()
                .filter_map(|n| at.get(n).map(|r| *r == id))
                .collect();
            let arrived = back.iter().filter(|b| **b).count();
            if back.is_empty() || !live.contains(&id) {
                continue;
            }
            if arrived * 2 >= back.len() {
                self.shunned.remove(&id);
            } else {
                let e = self.shunned.entry(id.clone()).or_insert((0, 0));
                e.0 += 1;
                e.1 = 1 << e.0.min(6);
                new.push(id);
            }
        }
        let mut skip = HashSet::new();
        for (id, (_, left)) in &mut self.shunned {
            if *left > 0 {
                *left -= 1;
                skip.insert(id.clone());
            }
        }
        (skip, new)
    }
}

impl Balancer {
    /// One pass: plan from the live sessions and the replicas seen within a lease, then close
    /// the sessions to move.
    pub(crate) async fn pass(&self, cp: &ControlPlane) -> anyhow::Result<serde_json::Value> {
        if !cp.ha.replicated() {
            return Ok(json!({ "moved": 0 }));
        }
        let window = i64::try_from(cp.config.ha.lease_ttl.as_millis()).unwrap_or(6_000);
        let live = cp.store.live_replicas(window).await?;
        let now = SystemTime::now();
        let sessions: Vec<Held> = cp
            .registry
            .sessions()
            .into_iter()
            .map(|(node, s, busy)| Held {
                node,
                generation: s.generation,
                replica: s.relayed_by.unwrap_or_else(|| cp.ha.replica.clone()),
                age: now.duration_since(s.connected_at).unwrap_or_default(),
                movable: s.protocol_minor >= MOVE_MINOR && !busy,
            })
            .collect();
        let at: HashMap<Uuid, &str> = sessions
            .iter()
            .map(|s| (s.node, s.replica.as_str()))
            .collect();
        let ids: HashSet<String> = live.iter().map(|r| r.id.clone()).collect();
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let (skip, shunned) = memory.review(&at, &ids);
        let replicas: Vec<Replica> = live
            .into_iter()
            .map(|r| Replica {
                takes: !skip.contains(&r.id),
                id: r.id,
                addr: r.quic_addr,
            })
            .collect();
        let moves = plan(&sessions, &replicas, cp.config.ha.balance_interval);
        let mut moved = 0u64;
        for m in &moves {
            if cp
                .registry
                .close_if_idle(m.node, m.generation, close::MOVE, &m.to)
            {
                moved += 1;
                memory.sent.entry(m.to_id.clone()).or_default().push(m.node);
            }
        }
        drop(memory);
        if moved > 0 {
            cp.metrics.sessions_moved.inc_by(moved);
            info!(
                moved,
                sessions = sessions.len(),
                replicas = replicas.len(),
                "moved agent sessions to replicas holding fewer than their share"
            );
        }
        if !shunned.is_empty() {
            tracing::warn!(
                replicas = ?shunned,
                "agents moved to these replicas did not arrive: none are sent there for a while \
                 (check their public_address)"
            );
        }
        Ok(json!({
            "moved": moved,
            "sessions": sessions.len(),
            "replicas": replicas.len(),
            "shunned": skip.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(30);

    fn replicas(n: usize) -> Vec<Replica> {
        (0..n)
            .map(|i| Replica {
                id: format!("r{i}"),
                addr: format!("10.0.0.{i}:7443"),
                takes: true,
            })
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
                .map_or(s.replica.clone(), |m| m.to_id.clone());
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
        // In a small fleet one young session does not hold balancing up.
        let mut s = held(&[3, 0, 0], MIN * 2);
        s.extend(held(&[0, 1, 0], Duration::from_secs(1)));
        assert_eq!(plan(&s, &replicas(3), MIN).len(), 1);
    }

    #[test]
    fn old_or_busy_agents_a_dead_replicas_sessions_and_a_shunned_replica_are_left_alone() {
        let mut s = held(&[4, 0], MIN * 2);
        for h in &mut s {
            h.movable = false;
        }
        assert!(plan(&s, &replicas(2), MIN).is_empty(), "not movable");
        // r2 is gone: its six sessions count for nobody's share, and r1 gets r0's extra ones.
        let s = held(&[6, 0, 6], MIN * 2);
        let moves = plan(&s, &replicas(2), MIN);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert!(moves.iter().all(|m| m.from == "r0" && m.to_id == "r1"));
        // A replica that takes none gets none; another one under its share does.
        let mut r = replicas(3);
        r[1].takes = false;
        let s = held(&[60, 0, 0], MIN * 2);
        let moves = plan(&s, &r, MIN);
        assert_eq!(moves.len(), 3);
        assert!(moves.iter().all(|m| m.to_id == "r2"), "{moves:?}");
    }

    #[test]
    fn a_replica_the_moved_agents_do_not_reach_is_shunned_longer_each_time() {
        let mut m = Memory::default();
        let live: HashSet<String> = ["r0", "r1"].into_iter().map(String::from).collect();
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        // Two of three sent to r1 arrived; the fourth is not back yet (not judged).
        m.sent.insert("r1".into(), vec![a, b, c, d]);
        let at = HashMap::from([(a, "r1"), (b, "r1"), (c, "r0")]);
        assert!(m.review(&at, &live).0.is_empty());
        // None arrived: no moves to it for two passes, then a try.
        m.sent.insert("r1".into(), vec![a, b]);
        let away = HashMap::from([(a, "r0"), (b, "r0")]);
        let (skip, new) = m.review(&away, &live);
        assert!(skip.contains("r1") && new == ["r1"]);
        let (skip, new) = m.review(&away, &live);
        assert!(skip.contains("r1") && new.is_empty(), "warned once");
        assert!(m.review(&away, &live).0.is_empty());
        // Failing again: four passes.
        m.sent.insert("r1".into(), vec![a]);
        let skipped = (0..6)
            .filter(|_| m.review(&away, &live).0.contains("r1"))
            .count();
        assert_eq!(skipped, 4);
        // Arriving again clears it; a replica gone is forgotten.
        m.sent.insert("r1".into(), vec![a]);
        assert!(m.review(&HashMap::from([(a, "r1")]), &live).0.is_empty());
        assert!(!m.shunned.contains_key("r1"));
        m.sent.insert("r1".into(), vec![a]);
        m.review(&away, &live);
        assert!(m.shunned.contains_key("r1"));
        m.review(&away, &HashSet::from(["r0".to_owned()]));
        assert!(m.shunned.is_empty());
    }
}
