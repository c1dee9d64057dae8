//! OCI spec pieces the agent's host tests and the end-to-end tests both send.

use kiln_protocol::oci;

/// The device rule of a privileged container (`docker run --privileged`):
/// every device, read, write and mknod.
pub fn allow_all_devices() -> oci::LinuxDeviceCgroup {
    let mut all = oci::LinuxDeviceCgroup::new();
    all.Allow = true;
    all.Type = "a".into();
    all.Major = -1;
    all.Minor = -1;
    all.Access = "rwm".into();
    all
}

/// `s` with `linux.resources.memory.limit` set (memory.max in the guest).
pub fn with_memory_limit(mut s: oci::Spec, bytes: i64) -> oci::Spec {
    let linux = s.Linux.mut_or_insert_default();
    let res = linux.Resources.mut_or_insert_default();
    res.Memory.mut_or_insert_default().Limit = bytes;
    s
}
