//! Containers of a sandbox: the bundle on the host, its share into the guest, and its lifecycle.

pub mod bundle;
pub mod hooks;
pub mod io;
pub mod seccomp;
pub mod share;
pub mod spec;
pub mod tmpfs;
