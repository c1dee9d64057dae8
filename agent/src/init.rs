//! What the agent does when the kernel starts it as PID 1: leave the
//! initramfs for a tmpfs root, mount the pseudo filesystems, attach the
//! console, and become a subreaper-of-last-resort.
//!
//! Every step logs and carries on when it fails: a PID 1 that exits panics the
//! kernel, and a partly set-up guest the host can still talk to is more useful.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// One pseudo filesystem to mount at start-up.
struct PseudoFs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<String>,
}

/// `run_size`: `agent.run_size`, read once /proc is mounted (the first entry).
fn pseudo_filesystems(run_size: &str) -> Vec<PseudoFs> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        PseudoFs {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        PseudoFs {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        PseudoFs {
            source: "dev",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755".into()),
        },
        PseudoFs {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some(format!("mode=0755,size={run_size}")),
        },
        PseudoFs {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: None,
        },
        PseudoFs {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("gid=5,mode=620,ptmxmode=666".into()),
        },
        PseudoFs {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev_noexec,
            data: Some("mode=1777".into()),
        },
        PseudoFs {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev_noexec,
            data: None,
        },
    ]
}

/// Leaves the initramfs for a tmpfs root ([`crate::initramfs`]), then mounts
/// everything; returns (what it did, problems) instead of failing.
pub fn setup_pid1() -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    match crate::initramfs::leave() {
        Ok(Some(note)) => notes.push(note),
        Ok(None) => {}
        Err(e) => problems.push(format!("{e}; containers fall back to chroot")),
    }
    // /proc (the first entry) before the rest: `agent.run_size` on the
    // command line sizes /run.
    let all = pseudo_filesystems(crate::config::RUN_SIZE);
    mount_pseudo(all.into_iter().take(1), &mut problems);
    let cmdline = kernel_cmdline(Path::new("/proc"));
    let run_size = crate::config::AgentConfig::from_cmdline(&cmdline)
        .0
        .run_size;
    mount_pseudo(
        pseudo_filesystems(&run_size).into_iter().skip(1),
        &mut problems,
    );
    if let Err(e) = attach_console() {
        problems.push(format!("console: {e}"));
    }
    // The kernel starts init with an empty environment apart from a few
    // variables; give child processes a usable PATH.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    (notes, problems)
}

/// Mounts each of `list` that is not mounted yet; failures go to `problems`.
fn mount_pseudo(list: impl Iterator<Item = PseudoFs>, problems: &mut Vec<String>) {
    for fs in list {
        if is_mounted(fs.target) {
            continue;
        }
        if let Err(e) = fs::create_dir_all(fs.target) {
            problems.push(format!("mkdir {}: {e}", fs.target));
            continue;
        }
        if let Err(e) = mount(
            Some(fs.source),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data.as_deref(),
        ) {
            problems.push(format!("mount {} on {}: {e}", fs.fstype, fs.target));
        }
    }
}

/// Points stdin/stdout/stderr at /dev/console (devtmpfs provides it even when
/// the initrd had no node) and makes it our controlling terminal.
fn attach_console() -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let _ = nix::unistd::setsid();
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let fd = console.as_raw_fd();
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `fd` is open for the call.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(nix::errno::Errno::last());
        }
    }
    // SAFETY: TIOCSCTTY on our own console fd with arg 1 (steal if needed).
    unsafe { libc::ioctl(0, libc::TIOCSCTTY, 1) };
    Ok(())
}

fn is_mounted(target: &str) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts_contain(&mounts, target)
}

fn mounts_contain(mounts: &str, target: &str) -> bool {
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
}

/// True when this process is the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Reads the kernel command line; empty when /proc is not available.
pub fn kernel_cmdline(proc_root: &Path) -> String {
    fs::read_to_string(proc_root.join("cmdline")).unwrap_or_default()
}

/// Brings the loopback interface up, as Kata's agent does in init mode:
/// the guest boots with `lo` down, and containers (which share the guest's
/// network namespace) expect 127.0.0.1 and ::1 to answer.
pub fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain datagram socket for the interface ioctls; owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_comes_up_in_a_fresh_network_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: a network namespace needs root");
            return;
        }
        // A new network namespace starts with lo down; only this thread is in it.
        let up = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let before = std::process::Command::new("ip")
                .args(["-o", "link", "show", "lo"])
                .output();
            loopback_up().unwrap();
            let after = std::process::Command::new("ip")
                .args(["-o", "link", "show", "lo"])
                .output();
            (before.ok(), after.ok())
        })
        .join()
        .unwrap();
        // `ip` runs in the thread's namespace (fork inherits it); skip if absent.
        if let (Some(b), Some(a)) = up {
            let (b, a) = (
                String::from_utf8_lossy(&b.stdout),
                String::from_utf8_lossy(&a.stdout),
            );
            assert!(!b.contains(",UP") && !b.contains("<UP"), "{b}");
            assert!(a.contains("UP"), "{a}");
        }
    }

    #[test]
    fn mount_table_lookup_matches_whole_target() {
        let m = "proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n";
        assert!(mounts_contain(m, "/proc"));
        assert!(!mounts_contain(m, "/pro"));
        assert!(!mounts_contain(m, "/run"));
    }

    #[test]
    fn pid1_mounts_include_what_containers_need() {
        let fss = pseudo_filesystems("64m");
        let targets: Vec<_> = fss.iter().map(|f| f.target).collect();
        let run = fss.iter().find(|f| f.target == "/run").unwrap();
        assert_eq!(run.data.as_deref(), Some("mode=0755,size=64m"));
        for t in [
            "/proc",
            "/sys",
            "/dev",
            "/run",
            "/sys/fs/cgroup",
            "/dev/pts",
        ] {
            assert!(targets.contains(&t), "{t}");
        }
        // /proc first: setup_pid1 reads agent.run_size from it before /run.
        assert_eq!(targets[0], "/proc");
        // Parents before children.
        let pos = |t| targets.iter().position(|x| *x == t).unwrap();
        assert!(pos("/sys") < pos("/sys/fs/cgroup") && pos("/dev") < pos("/dev/pts"));
    }
}
