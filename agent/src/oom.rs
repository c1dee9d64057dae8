//! OOM kills per container: `memory.events` changes wake an inotify watch
//! (cgroup v2 raises a modify event on it), and a rise of `oom_kill` sends the
//! container id to GetOOMEvent's queue.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::container::cgroups::flat_keyed;

fn inotify_on(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscalls; the fd is owned right away.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

fn oom_kills(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| flat_keyed(&s, "oom_kill"))
        .unwrap_or(0)
}

/// Runs until the container goes away (the task is aborted then).
pub async fn watch(container_id: String, events: PathBuf, tx: mpsc::Sender<String>) {
    let fd = match inotify_on(&events)
        .and_then(|fd| crate::container::stdio::async_fd(fd, Interest::READABLE))
    {
        Ok(fd) => fd,
        Err(e) => {
            // A kernel without CONFIG_INOTIFY_USER: look every few seconds.
            tracing::info!(container = %container_id, "no inotify ({e}); polling {} for OOM kills", events.display());
            return poll(container_id, events, tx).await;
        }
    };
    let mut seen = oom_kills(&events);
    let mut buf = [0u8; 4096];
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        }
        seen = report(&container_id, &events, seen, &tx);
    }
}

/// Sends the container id when the kill count rose; returns the new count.
fn report(
    container_id: &str,
    events: &std::path::Path,
    seen: u64,
    tx: &mpsc::Sender<String>,
) -> u64 {
    let now = oom_kills(events);
    if now > seen {
        tracing::warn!(container = %container_id, kills = now, "container OOM kill");
        // A full queue means nobody is asking; dropping an event is fine.
        let _ = tx.try_send(container_id.to_string());
    }
    now
}

async fn poll(container_id: String, events: PathBuf, tx: mpsc::Sender<String>) {
    let mut seen = oom_kills(&events);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        if !events.exists() {
            return;
        }
        seen = report(&container_id, &events, seen, &tx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rising_oom_kill_count_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        std::fs::write(&f, "low 0\noom 0\noom_kill 0\n").unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(watch("c1".into(), f.clone(), tx));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::write(&f, "low 0\noom 0\noom_kill 0\n").unwrap();
        std::fs::write(&f, "low 0\noom 1\noom_kill 1\n").unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("c1"));
        task.abort();
    }
}
