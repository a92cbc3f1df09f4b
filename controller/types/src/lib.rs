//! Types that the controller's API, its store and its clients share, with no behaviour beyond
//! serde and formatting: roles and the authorization table, job records, their targets and
//! states; the HTTP API's request and response bodies ([`api`]); the fleet's public events
//! ([`events`]).

pub mod api;
pub mod auth;
pub mod events;
pub mod jobs;
