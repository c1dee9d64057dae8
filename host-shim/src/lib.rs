//! kiln-shim as a library: the pieces the `kiln-shim` binary is made of, public
//! so end-to-end tests drive a real VM through the same code.

pub mod bench_exec;
pub mod check;
pub mod client;
pub mod config;
pub mod exec;
pub mod id_shift;
pub mod image;
pub mod installed;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod rootfs_disk;
pub mod rpc_cli;
pub mod run;
pub mod smoke;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod vfio;
pub mod virtiofs;
pub mod vm;
pub mod vsock;
