//! Helpers shared by the tools' integration tests, one module per concern: `server` (real
//! `nbd-server` processes and the commands run against them), `flood` (hostile connections),
//! `metrics` (scraping `/metrics` and parsing it) and `vm` (a Linux guest under
//! QEMU whose disk is an NBD export, and a QMP client).

// Every test crate compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod data;
pub mod flood;
pub mod metrics;
pub mod server;
pub mod vm;
