//! One file per page.

pub(crate) mod admin;
pub(crate) mod alerts;
pub(crate) mod containers;
pub(crate) mod discord;
pub(crate) mod enroll;
pub(crate) mod jobs;
pub(crate) mod login;
pub(crate) mod monitors;
pub(crate) mod node;
pub(crate) mod overview;
pub(crate) mod secrets;
pub(crate) mod services;
pub(crate) mod storage;
pub(crate) mod workflows;
