//! The integration tests, in one binary so that the workspace is linked once: real `nebula serve`
//! and `nebula-agent` processes, a real Docker Engine, PostgreSQL and Chromium. One module per
//! area; shared helpers (processes, HTTP, SSE, Docker, raw QUIC sessions) live in `common`.

mod common;

mod agent_install;
mod agents;
mod ai;
mod alerts;
mod backup;
mod chaos;
mod containers;
mod dashboard;
mod dashboard_http;
mod deploy;
mod discord;
mod fleet;
mod ha;
mod https;
mod jobs;
mod monitors;
mod refusals;
mod secret_deploys;
mod secrets;
mod tasks;
mod telemetry;
mod wake;
mod workflows;
