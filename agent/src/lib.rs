//! kiln-agent as a library: every module of the agent, so the binary
//! (`main.rs`), its tests and the fuzz targets (`fuzz/`) reach the same code.
//! The binary is a thin start-up around [`server::serve`].

pub mod beneath;
pub mod ccw;
pub mod command;
pub mod config;
pub mod container;
pub mod copy_file;
pub mod debug_console;
pub mod devices;
pub mod dm;
pub mod error;
pub mod facts;
pub mod guest;
pub mod init;
pub mod initramfs;
pub mod iptables;
pub mod kmod;
pub mod mem_agent;
pub mod metrics;
pub mod namespaces;
#[cfg(feature = "netlink")]
pub mod network;
#[cfg(not(feature = "netlink"))]
#[path = "network_stub.rs"]
pub mod network;
pub mod oom;
pub mod paths;
pub mod pci;
pub mod policy;
pub mod random;
pub mod reaper;
pub mod rpc;
pub mod sandbox;
pub mod server;
pub mod storage;
pub mod swap;
pub mod uevent;
pub mod volume;
pub mod watchable;
