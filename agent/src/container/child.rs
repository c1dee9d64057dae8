//! The container helper: the agent binary re-executed with
//! `--kiln-container-helper`, so namespace and mount work happens in a fresh
//! single-threaded process (forking the multi-threaded agent and doing that
//! work in the child is not async-signal-safe).
//!
//! The helper joins the container's cgroup, enters or creates the pid
//! namespace (which only affects children), forks, reports the child's pid
//! and exits. The child builds the container (or joins one, for exec), says
//! Ready, waits for Start, drops to the spec's user and capabilities,
//! installs the spec's seccomp filter, and execs. A successful exec closes
//! the close-on-exec control socket, which is how the agent learns it
//! worked; a failure is reported as text.
//!
//! Nothing here writes to stdout/stderr: those are the container's streams.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{ForkResult, Gid, Uid};

use super::mounts;
use super::seccomp;
use super::spec::{CapabilitySpec, ContainerSpec, NamespaceKind, ProcessSpec};
use super::wire::{self, Config, LaunchKind, Report};

type Res<T> = std::result::Result<T, String>;

/// Entry point when argv[1] is [`wire::HELPER_ARG`]. Never returns.
pub fn helper_main() -> ! {
    // Not ptraceable and no /proc/<pid> access for others (container root
    // included) until the workload's execve, which resets it.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: the agent put the control socket at CONTROL_FD for us and
    // nothing else in this fresh process owns it.
    let ctl = unsafe { UnixStream::from_raw_fd(wire::CONTROL_FD) };
    set_cloexec(wire::CONTROL_FD);
    let code = run(ctl);
    std::process::exit(code)
}

fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on an fd number; failure is harmless here.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn report(ctl: &mut UnixStream, r: &Report) {
    let _ = wire::write_frame_blocking(ctl, &wire::encode_report(r));
}

fn run(mut ctl: UnixStream) -> i32 {
    let cfg = match wire::read_frame_blocking(&mut ctl) {
        Ok(Some(b)) => match wire::decode_config(&b) {
            Ok(c) => c,
            Err(e) => {
                report(&mut ctl, &Report::Error(e));
                return 1;
            }
        },
        _ => return 1,
    };
    let spec = match ContainerSpec::from_oci(&cfg.spec) {
        Ok(s) => s,
        Err(e) => {
            report(&mut ctl, &Report::Error(e.message));
            return 1;
        }
    };
    if let Err(e) = before_fork(&cfg, &spec) {
        report(&mut ctl, &Report::Error(e));
        return 1;
    }
    // The child must not speak before its pid has been reported: it waits
    // for EOF on this pipe, which comes when the parent exits after reporting.
    let (gate_r, gate_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            report(&mut ctl, &Report::Error(format!("pipe: {e}")));
            return 1;
        }
    };
    // SAFETY: this process is single-threaded (a fresh exec of the agent
    // binary that started no runtime), so fork is safe.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            report(&mut ctl, &Report::Error(format!("fork: {e}")));
            1
        }
        Ok(ForkResult::Parent { child }) => {
            drop(gate_r);
            report(&mut ctl, &Report::Pid(child.as_raw()));
            drop(gate_w);
            0
        }
        Ok(ForkResult::Child) => {
            drop(gate_w);
            let mut f = fs::File::from(gate_r);
            let _ = std::io::Read::read_to_end(&mut f, &mut Vec::new());
            drop(f);
            let code = child_main(&mut ctl, &cfg, &spec);
            std::process::exit(code)
        }
    }
}

/// cgroup and pid namespace: both must be in place before the fork.
fn before_fork(cfg: &Config, spec: &ContainerSpec) -> Res<()> {
    if let Some(cg) = &cfg.cgroup {
        let procs = cg.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(b"0"))
            .map_err(|e| format!("joining cgroup {}: {e}", cg.display()))?;
    }
    match cfg.kind {
        LaunchKind::Init => {
            if let Some(ns) = spec.namespace(NamespaceKind::Pid) {
                match &ns.path {
                    Some(p) => join_ns(p, CloneFlags::CLONE_NEWPID)?,
                    None => unshare(CloneFlags::CLONE_NEWPID)
                        .map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?,
                }
            }
        }
        LaunchKind::Exec => join_ns(
            &proc_ns(cfg.join_pid, NamespaceKind::Pid),
            CloneFlags::CLONE_NEWPID,
        )?,
    }
    Ok(())
}

fn proc_ns(pid: i32, kind: NamespaceKind) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/{}", kind.proc_name()))
}

fn join_ns(path: &Path, flag: CloneFlags) -> Res<()> {
    let f =
        fs::File::open(path).map_err(|e| format!("opening namespace {}: {e}", path.display()))?;
    setns(f, flag).map_err(|e| format!("setns({}): {e}", path.display()))
}

fn child_main(ctl: &mut UnixStream, cfg: &Config, spec: &ContainerSpec) -> i32 {
    let setup = match cfg.kind {
        LaunchKind::Init => setup_init(cfg, spec),
        LaunchKind::Exec => join_container(cfg.join_pid),
    };
    if let Err(e) = setup {
        report(ctl, &Report::Error(e));
        return 1;
    }
    report(ctl, &Report::Ready);
    match wire::read_frame_blocking(ctl) {
        Ok(Some(b)) if b == wire::START => {}
        _ => return 1, // the agent gave up on us
    }
    let err = exec_process(&spec.process, spec.seccomp.as_ref());
    report(ctl, &Report::Error(err));
    127
}

fn setup_init(cfg: &Config, spec: &ContainerSpec) -> Res<()> {
    let mut own_mount_ns = true;
    for kind in [
        NamespaceKind::Mount,
        NamespaceKind::Uts,
        NamespaceKind::Ipc,
        NamespaceKind::Cgroup,
    ] {
        match spec.namespace(kind) {
            Some(ns) => match &ns.path {
                Some(p) => {
                    join_ns(p, kind.clone_flag())?;
                    if kind == NamespaceKind::Mount {
                        own_mount_ns = false;
                    }
                }
                None => {
                    unshare(kind.clone_flag()).map_err(|e| format!("unshare({kind:?}): {e}"))?
                }
            },
            // The agent's mount namespace is never modified: a container
            // always gets its own, even when the spec forgot to ask.
            None if kind == NamespaceKind::Mount => {
                unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(mount): {e}"))?
            }
            None => {}
        }
    }
    if own_mount_ns {
        mounts::prepare_rootfs(spec, cfg.no_pivot)?;
    }
    let new_uts = spec
        .namespace(NamespaceKind::Uts)
        .is_some_and(|n| n.path.is_none());
    if let (Some(h), true) = (&spec.hostname, new_uts) {
        nix::unistd::sethostname(h).map_err(|e| format!("sethostname({h}): {e}"))?;
    }
    Ok(())
}

fn join_container(init_pid: i32) -> Res<()> {
    for kind in [
        NamespaceKind::Cgroup,
        NamespaceKind::Ipc,
        NamespaceKind::Uts,
        NamespaceKind::Mount,
    ] {
        let path = proc_ns(init_pid, kind);
        // /proc/self, not /proc/<getpid()>: this process already lives in the
        // container's pid namespace, where getpid() is a small number that
        // names another process (e.g. the init itself) in this /proc. Reading
        // that one's namespace made the mount namespace look joined, and the
        // exec ran in the guest's root instead of the container's.
        let ours = fs::read_link(Path::new("/proc/self/ns").join(kind.proc_name())).ok();
        // Same namespace as ours (not unshared by the container): nothing to do.
        if ours.is_some() && fs::read_link(&path).ok() == ours {
            continue;
        }
        join_ns(&path, kind.clone_flag())?;
    }
    Ok(())
}

/// Drops into the process described by the spec and execs it. Returns only
/// on failure, with the reason.
fn exec_process(p: &ProcessSpec, seccomp: Option<&seccomp::Profile>) -> String {
    match prepare_and_exec(p, seccomp) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn prepare_and_exec(p: &ProcessSpec, seccomp: Option<&seccomp::Profile>) -> Res<Never> {
    let filter = match seccomp {
        Some(profile) => {
            let arch = <seccomp::Arch as seccomp::SeccompArch>::native()
                .ok_or("seccomp profiles are not supported on this architecture")?;
            Some(seccomp::compile(profile, arch).map_err(|e| e.message)?)
        }
        None => None,
    };
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    if p.terminal {
        // SAFETY: TIOCSCTTY on our stdin, which is the pty slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "making the pty our controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    for r in &p.rlimits {
        nix::sys::resource::setrlimit(r.resource, r.soft, r.hard)
            .map_err(|e| format!("setrlimit({:?}): {e}", r.resource))?;
    }
    if let Some(adj) = p.oom_score_adj {
        fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("oom_score_adj: {e}"))?;
    }
    let (uid, gid) = match (&p.user.username, p.user.uid, p.user.gid) {
        (Some(name), 0, 0) => {
            lookup_user(&fs::read_to_string("/etc/passwd").unwrap_or_default(), name)
                .ok_or_else(|| format!("user {name:?} not found in the container's /etc/passwd"))?
        }
        _ => (p.user.uid, p.user.gid),
    };
    nix::unistd::chdir(&p.cwd).map_err(|e| format!("chdir to cwd {}: {e}", p.cwd.display()))?;
    let exe = resolve_executable(&p.args[0], p.path_var())?;
    let argv = cstrings(&p.args)?;
    let envp = cstrings(&p.env)?;
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| "executable path contains NUL".to_string())?;

    // Without no_new_privs the kernel takes a filter only from a process with
    // CAP_SYS_ADMIN, which the switch below may drop: then the filter goes in
    // first (as runc does), and the profile must allow the switch's syscalls.
    if let Some(f) = filter.as_ref().filter(|_| !p.no_new_privileges) {
        seccomp::install(f)?;
    }
    switch_user(uid, gid, &p.user.additional_gids, &p.capabilities)?;
    if p.no_new_privileges {
        // SAFETY: prctl with plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!(
                "PR_SET_NO_NEW_PRIVS: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    reset_signals();
    close_other_fds();
    // With no_new_privs: as late as possible, so only execve runs under it.
    if let Some(f) = filter.as_ref().filter(|_| p.no_new_privileges) {
        seccomp::install(f)?;
    }
    let e = nix::unistd::execve(&exe_c, &argv, &envp)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    Err(format!("exec {}: {e}", exe.display()))
}

fn cstrings(v: &[String]) -> Res<Vec<CString>> {
    v.iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains NUL")))
        .collect()
}

/// `name` as is when it has a slash, else the first executable match in PATH.
pub fn resolve_executable(name: &str, path: &str) -> Res<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    // Errors other than "no such file" (EIO, EINTR, ENOMEM...) are worth
    // naming: they are not the user's mistake.
    let mut odd = Vec::new();
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(name);
        match fs::metadata(&cand) {
            Ok(md) if md.is_file() && md.permissions().mode() & 0o111 != 0 => return Ok(cand),
            Ok(md) => odd.push(format!(
                "{}: not an executable file (type {:?}, mode {:o})",
                cand.display(),
                md.file_type(),
                md.permissions().mode()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => odd.push(format!("{}: {e}", cand.display())),
        }
    }
    if odd.is_empty() {
        Err(format!("executable {name:?} not found in PATH {path:?}"))
    } else {
        Err(format!(
            "executable {name:?} not found in PATH {path:?} ({})",
            odd.join("; ")
        ))
    }
}

/// uid and gid of `name` in passwd(5) text.
pub fn lookup_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn cap_set(names: &[String], supported: &caps::CapsHashSet) -> caps::CapsHashSet {
    names
        .iter()
        .filter_map(|n| n.parse::<caps::Capability>().ok())
        .filter(|c| supported.contains(c))
        .collect()
}

fn switch_user(uid: u32, gid: u32, groups: &[u32], c: &CapabilitySpec) -> Res<()> {
    use caps::CapSet;
    let supported = caps::runtime::thread_all_supported();
    let keep = cap_set(&c.bounding, &supported);
    for cap in supported.iter().filter(|c| !keep.contains(c)) {
        caps::drop(None, CapSet::Bounding, *cap)
            .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
    }
    // Keep permitted capabilities across the uid change; they are
    // narrowed to the spec's sets right after.
    caps::securebits::set_keepcaps(true).map_err(|e| format!("PR_SET_KEEPCAPS: {e}"))?;
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&gids).map_err(|e| format!("setgroups({groups:?}): {e}"))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setgid({gid}): {e}"))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setuid({uid}): {e}"))?;
    // One capset for all three: set one by one, the kernel would refuse
    // a permitted set smaller than the current effective one.
    capset(
        &cap_set(&c.effective, &supported),
        &cap_set(&c.permitted, &supported),
        &cap_set(&c.inheritable, &supported),
    )?;
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient)
            .map_err(|e| format!("clearing ambient capabilities: {e}"))?;
        for cap in cap_set(&c.ambient, &supported) {
            // Ambient needs the cap in permitted and inheritable; skip the rest as runc does.
            let _ = caps::raise(None, CapSet::Ambient, cap);
        }
    }
    let _ = caps::securebits::set_keepcaps(false);
    Ok(())
}

/// Capability set as capset(2)'s two 32-bit words.
pub fn cap_words(set: &caps::CapsHashSet) -> [u32; 2] {
    let mut w = [0u32; 2];
    for c in set {
        let i = c.index() as usize;
        if i < 64 {
            w[i / 32] |= 1 << (i % 32);
        }
    }
    w
}

fn capset(eff: &caps::CapsHashSet, perm: &caps::CapsHashSet, inh: &caps::CapsHashSet) -> Res<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let (e, p, i) = (cap_words(eff), cap_words(perm), cap_words(inh));
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [0, 1].map(|k| Data {
        effective: e[k],
        permitted: p[k],
        inheritable: i[k],
    });
    // SAFETY: capset reads a v3 header and two data words that live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "capset(effective {e:x?}, permitted {p:x?}, inheritable {i:x?}): {} (effective must be within permitted)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Default dispositions and an empty mask: the agent ignores SIGPIPE and
/// its runtime may block signals; the container must not inherit that.
fn reset_signals() {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL is always sound.
            let _ = unsafe { sigaction(sig, &dfl) };
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}

/// Marks every fd above stderr close-on-exec (the control socket included:
/// its closing tells the agent the exec worked).
fn close_other_fds() {
    // SAFETY: close_range with the CLOEXEC flag only changes fd flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        if let Ok(dir) = fs::read_dir("/proc/self/fd") {
            let fds: Vec<i32> = dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            for fd in fds.into_iter().filter(|fd| *fd > 2) {
                set_cloexec(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_words() {
        let set: caps::CapsHashSet = [
            caps::Capability::CAP_CHOWN,
            caps::Capability::CAP_NET_BIND_SERVICE,
            caps::Capability::CAP_SYSLOG,
        ]
        .into_iter()
        .collect();
        // CHOWN is 0, NET_BIND_SERVICE 10, SYSLOG 34.
        assert_eq!(cap_words(&set), [0x401, 0x4]);
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n# comment\nnobody:x:65534:65534::/:/bin/false\nbad:x:zz:1::/:\n";
        assert_eq!(lookup_user(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(lookup_user(passwd, "root"), Some((0, 0)));
        assert_eq!(lookup_user(passwd, "bad"), None);
        assert_eq!(lookup_user(passwd, "ghost"), None);
    }

    #[test]
    fn executables_are_found_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("tool"), "").unwrap();
        fs::set_permissions(bin.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(bin.join("data"), "").unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(resolve_executable("tool", &path).unwrap(), bin.join("tool"));
        assert!(resolve_executable("data", &path).is_err(), "not executable");
        assert_eq!(
            resolve_executable("/x/y", &path).unwrap(),
            PathBuf::from("/x/y")
        );
    }
}
