//! The health-monitor as a process and over its database, on both backends.

mod basics;
