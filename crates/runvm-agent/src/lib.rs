//! The runvm guest agent as a library, for its binary (`main.rs`, PID 1 in the VM) and for the
//! fuzz targets (`fuzz/`), which serve [`service::Agent`] in-process over a fake
//! [`service::Backend`].

pub mod container;
pub mod error;
pub mod hotplug;
pub mod init;
pub mod metrics;
pub mod network;
pub mod portfwd;
pub mod reaper;
pub mod service;
pub mod telemetry;
