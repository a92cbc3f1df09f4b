//! Types that the controller's API, its store and its clients share, with no behaviour beyond
//! serde and formatting: job records, their targets and states.

pub mod jobs;
