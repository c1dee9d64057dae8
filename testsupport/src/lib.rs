//! Helpers kiln's test suites share, in one crate that is only ever a
//! dev-dependency (xtask also uses the busybox tree for its dev loop and
//! bench; xtask is not shipped). Nothing here is compiled into an artifact.
//!
//! - [`busybox`]: a container root filesystem from the host's static busybox.
//! - [`agent`] (feature `agent`): the agent binary served on a unix socket.
//! - [`spec`] (either feature): spec pieces both kinds of test send.
//! - [`streams`] (either feature): reading a process's output to EOF.
//! - [`tamper`]: flipping one stored byte, for the tests that must see it refused.
//! - [`vm`] (feature `shim`): a booted VM with a sandbox, the container calls
//!   the end-to-end tests make, and the specs they send.

#[cfg(feature = "agent")]
pub mod agent;
pub mod busybox;
#[cfg(any(feature = "agent", feature = "shim"))]
pub mod spec;
#[cfg(any(feature = "agent", feature = "shim"))]
pub mod streams;
pub mod tamper;
#[cfg(feature = "shim")]
pub mod vm;
