//! Workflows, pure: the `workflows.yml` schema and its checks ([`spec`]), expressions
//! ([`expr`]), the step state machine with its concurrency rules ([`engine`]), and AI agents'
//! definitions ([`agent`]). Nothing here
//! does I/O or needs a runtime: the controller stores what these return and carries it out
//! (steps on nodes as jobs of its job engine).

pub mod agent;
pub mod engine;
pub mod expr;
pub mod spec;
pub mod trigger;
