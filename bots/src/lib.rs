//! Chat front ends of the control plane. The Discord bot ([`discord`]) runs inside the
//! controller when a bot token is configured; every command it offers calls the same
//! control-plane operations as the HTTP API and the dashboard, judged by the same
//! authorization check, with the Discord user and server in the audit log.

pub mod discord;
