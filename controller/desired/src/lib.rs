//! Desired state, pure: the `service-map.yml` schema and its parser and validator ([`map`]),
//! the resolved desired state and the planner that compares it with what runs ([`plan`]).
//! Nothing here does I/O or needs a runtime; the controller's reconciler feeds it observations
//! and carries out the plan it returns.

pub mod map;
pub mod plan;
