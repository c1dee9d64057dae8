//! Kernel uevents (NETLINK_KOBJECT_UEVENT) for waiting on hot-plugged devices.
//!
//! Race-free waiting: subscribe first, then look at sysfs, then wait for
//! events, and look again after each relevant one. A device that appears
//! between the look and the wait still produces an event on the already-open
//! socket, so it cannot be missed.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{os, timeout, Result};

/// One kernel event: `ACTION`, `DEVPATH`, `SUBSYSTEM`, `DEVNAME`, ...
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Uevent {
    pub vars: HashMap<String, String>,
}

impl Uevent {
    pub fn get(&self, k: &str) -> &str {
        self.vars.get(k).map(String::as_str).unwrap_or("")
    }

    /// Parses a kernel message: `action@devpath\0KEY=VALUE\0...`. Messages
    /// from udev (`libudev` magic) are not the kernel's and are skipped.
    pub fn parse(buf: &[u8]) -> Option<Uevent> {
        let mut parts = buf.split(|b| *b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        if !header.contains('@') {
            return None;
        }
        let mut vars = HashMap::new();
        for p in parts {
            if let Ok(s) = std::str::from_utf8(p) {
                if let Some((k, v)) = s.split_once('=') {
                    vars.insert(k.to_string(), v.to_string());
                }
            }
        }
        vars.contains_key("ACTION").then_some(Uevent { vars })
    }
}

/// A subscription to kernel uevents.
pub struct UeventListener {
    fd: AsyncFd<OwnedFd>,
}

impl UeventListener {
    pub fn new() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(|e| os("opening a NETLINK_KOBJECT_UEVENT socket", e))?;
        // Bursts of hotplug events must not overflow the default buffer.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))
            .map_err(|e| os("subscribing to kernel uevents", e))?;
        let fd = crate::container::stdio::async_fd(fd, Interest::READABLE)
            .map_err(|e| os("watching the uevent socket", e))?;
        Ok(UeventListener { fd })
    }

    /// The next kernel event; `None` for a message that was not one, or when
    /// events were dropped (ENOBUFS: the caller should look at sysfs again).
    pub async fn next(&self) -> Result<Option<Uevent>> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| os("waiting for uevents", e))?;
            match guard.try_io(|inner| {
                nix::unistd::read(inner.get_ref().as_raw_fd(), &mut buf)
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(Uevent::parse(&buf[..n])),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(None),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(os("reading a uevent", e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Waits until `check` finds what it looks for, re-checking after every
/// event `relevant` accepts (and after lost events), for at most `limit`.
pub async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
    relevant: impl Fn(&Uevent) -> bool,
) -> Result<T> {
    // Already there: no subscription needed (nor possible without netlink).
    if let Some(t) = check() {
        return Ok(t);
    }
    let listener = UeventListener::new()?;
    if let Some(t) = check() {
        return Ok(t);
    }
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, listener.next()).await {
            Err(_) => break,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(ev)) => {
                if ev.as_ref().is_none_or(&relevant) {
                    if let Some(t) = check() {
                        return Ok(t);
                    }
                }
            }
        }
    }
    // One last look: the event may have raced with the deadline.
    check().ok_or_else(|| {
        timeout(format!(
            "{what} did not appear within {} s (agent.hotplug_timeout)",
            limit.as_secs()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_messages_and_skips_others() {
        let msg = b"add@/devices/pci0000:00/0000:00:02.0/0000:01:00.0/virtio3/block/vdb\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:02.0/0000:01:00.0/virtio3/block/vdb\0SUBSYSTEM=block\0MAJOR=254\0MINOR=16\0DEVNAME=vdb\0DEVTYPE=disk\0SEQNUM=1234\0";
        let ev = Uevent::parse(msg).unwrap();
        assert_eq!(ev.get("ACTION"), "add");
        assert_eq!(ev.get("SUBSYSTEM"), "block");
        assert_eq!(ev.get("DEVNAME"), "vdb");
        assert_eq!(ev.get("NOPE"), "");
        assert!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe").is_none());
        assert!(Uevent::parse(b"").is_none());
    }

    #[tokio::test]
    async fn wait_for_returns_at_once_when_present_and_times_out_otherwise() {
        if UeventListener::new().is_err() {
            eprintln!("skipping: no uevent netlink socket here (needs root)");
            return;
        }
        let v = wait_for("x", Duration::from_secs(1), || Some(5), |_| true)
            .await
            .unwrap();
        assert_eq!(v, 5);
        let t0 = Instant::now();
        let e = wait_for::<()>(
            "device /dev/nothing",
            Duration::from_millis(300),
            || None,
            |_| true,
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::DeadlineExceeded);
        assert!(e.message.contains("/dev/nothing"));
        assert!(t0.elapsed() >= Duration::from_millis(250));
    }
}
