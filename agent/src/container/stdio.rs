//! Loss-free process stdio (see seed 003 and Kata's fix for it).
//!
//! The agent owns its end of every stdio pipe (or the pty master) for as long
//! as the process is known, and a pump task drains stdout/stderr into an
//! in-memory buffer. So a process that writes and exits before the host reads
//! does not block on a full pipe and loses nothing: `ReadStdout` returns the
//! buffered bytes, then an empty answer for EOF, as Kata's agent does.
//!
//! * The buffer is bounded (`agent.output_buffer_size`, 8 MiB per stream by
//!   default, [`crate::config::OUTPUT_BUFFER_SIZE`]); when it is
//!   full the pump stops reading and the writer blocks on the pipe, which is
//!   back-pressure, not loss.
//! * EOF is the pipe's EOF (every writer closed). If something the process
//!   left behind keeps the pipe open, EOF is declared once the process has
//!   exited and the pipe stayed empty for [`EXIT_DRAIN`] (Kata does the same).
//! * Nothing polls: the pump sleeps in epoll (tokio `AsyncFd`, edge-triggered)
//!   and stops at EOF, so a hung-up pipe costs no CPU.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{watch, Notify};

use crate::error::{os, precondition, Result};

#[cfg(test)]
const OUTPUT_BUFFER_LIMIT: usize = crate::config::OUTPUT_BUFFER_SIZE;
/// Largest single ReadStdout/ReadStderr answer.
pub const MAX_READ: usize = 1 << 20;
/// After exit, how long an open-but-empty pipe is given before EOF.
pub const EXIT_DRAIN: Duration = Duration::from_millis(500);

/// Buffered output of one stream, filled by a pump and drained by RPCs.
pub struct OutputBuffer {
    state: Mutex<OutState>,
    readable: Notify,
    space: Notify,
    limit: usize,
}

#[derive(Default)]
struct OutState {
    data: VecDeque<u8>,
    eof: bool,
    eof_delivered: bool,
}

impl OutputBuffer {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(OutputBuffer {
            state: Mutex::new(OutState::default()),
            readable: Notify::new(),
            space: Notify::new(),
            limit,
        })
    }

    /// An already-finished stream (stderr of a terminal process): nobody
    /// needs to read its EOF for the process to count as drained.
    pub fn closed() -> Arc<Self> {
        let b = Self::new(0);
        {
            let mut st = b.lock();
            st.eof = true;
            st.eof_delivered = true;
        }
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, bytes: &[u8]) {
        self.lock().data.extend(bytes);
        self.readable.notify_waiters();
    }

    pub fn close(&self) {
        self.lock().eof = true;
        self.readable.notify_waiters();
    }

    /// Whether a reader has been told EOF (the stream is finished for good).
    pub fn eof_delivered(&self) -> bool {
        self.lock().eof_delivered
    }

    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.lock().data.len()
    }

    /// Waits until the buffer has room for more.
    async fn wait_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().data.len() < self.limit {
                return;
            }
            notified.await;
        }
    }

    /// Up to `max` bytes; an empty vector means EOF. Waits while there is
    /// nothing yet.
    pub async fn read(&self, max: usize) -> Vec<u8> {
        let max = max.clamp(1, MAX_READ);
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if !st.data.is_empty() {
                    let n = max.min(st.data.len());
                    let out: Vec<u8> = st.data.drain(..n).collect();
                    drop(st);
                    self.space.notify_waiters();
                    return out;
                }
                if st.eof {
                    st.eof_delivered = true;
                    return Vec::new();
                }
            }
            notified.await;
        }
    }
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and refers to the same open file
    // description until it is dropped, and as_raw_fd always returns it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// Sets O_NONBLOCK on the agent's end (the child's end stays blocking: the
/// two ends of a pipe are separate open file descriptions).
fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| os("F_GETFL", e))?;
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| os("setting O_NONBLOCK", e))?;
    Ok(())
}

/// Drains `fd` into `buf` until EOF (or, after exit, until the drain window
/// passes with nothing to read). `exited` turns `Some` when the process ends.
pub async fn pump(fd: OwnedFd, buf: Arc<OutputBuffer>, mut exited: watch::Receiver<Option<i32>>) {
    if let Err(e) = set_nonblocking(&fd) {
        tracing::warn!("stdio pump: {e}");
        buf.close();
        return;
    }
    let afd = match async_fd(fd, Interest::READABLE) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("stdio pump cannot watch its pipe: {e}");
            buf.close();
            return;
        }
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut has_exited = exited.borrow().is_some();
    loop {
        buf.wait_space().await;
        let guard = if has_exited {
            match tokio::time::timeout(EXIT_DRAIN, afd.readable()).await {
                Ok(g) => g,
                Err(_) => break, // exited, empty for the whole drain window
            }
        } else {
            tokio::select! {
                g = afd.readable() => g,
                changed = exited.changed() => {
                    // A dropped sender also means "no longer running".
                    has_exited = changed.is_err() || exited.borrow().is_some();
                    continue;
                }
            }
        };
        let mut guard = match guard {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("stdio pump: {e}");
                break;
            }
        };
        let res = guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref().as_raw_fd(), &mut chunk).map_err(std::io::Error::from)
        });
        match res {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.push(&chunk[..n]),
            // A pty master reads EIO once every slave fd is closed.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => break,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => {
                tracing::warn!("stdio pump read: {e}");
                break;
            }
            Err(_would_block) => continue,
        }
    }
    buf.close();
}

/// The agent's writing end of a process's stdin (pipe or pty master).
pub struct StdinWriter {
    fd: AsyncFd<OwnedFd>,
    tty: bool,
}

impl StdinWriter {
    pub fn new(fd: OwnedFd, tty: bool) -> Result<Self> {
        set_nonblocking(&fd)?;
        let fd = async_fd(fd, Interest::WRITABLE).map_err(|e| os("watching stdin", e))?;
        Ok(StdinWriter { fd, tty })
    }

    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// For a terminal, "closing stdin" means sending the EOF character
    /// (the line discipline turns it into a zero-length read); closing the
    /// master would hang the terminal up instead.
    pub async fn finish(self) {
        if self.tty {
            let eof = nix::sys::termios::tcgetattr(self.fd.get_ref().as_fd())
                .ok()
                .filter(|t| {
                    t.local_flags
                        .contains(nix::sys::termios::LocalFlags::ICANON)
                })
                .map(|t| {
                    t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize]
                });
            if let Some(c) = eof {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.write_all(&[c])).await;
            }
        }
    }
}

/// The child's three stdio descriptors.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends.
pub struct ParentStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    /// None for a terminal (one stream).
    pub stderr: Option<OwnedFd>,
    /// The pty master (a dup of `stdin`/`stdout`), for window size changes.
    pub tty: Option<OwnedFd>,
}

fn pipe(size: u32) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| os("creating a pipe", e))?;
    if size > 0 {
        if let Err(e) = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size as libc::c_int)) {
            // EPERM above /proc/sys/fs/pipe-max-size for unprivileged users;
            // the default size still works, just with less slack.
            tracing::warn!(size, "agent.container_pipe_size not applied: {e}");
        }
    }
    Ok((r, w))
}

/// Pipes for stdin, stdout and stderr, sized by `agent.container_pipe_size`.
pub fn pipes(pipe_size: u32) -> Result<(ParentStdio, ChildStdio)> {
    let (in_r, in_w) = pipe(pipe_size)?;
    let (out_r, out_w) = pipe(pipe_size)?;
    let (err_r, err_w) = pipe(pipe_size)?;
    Ok((
        ParentStdio {
            stdin: in_w,
            stdout: out_r,
            stderr: Some(err_r),
            tty: None,
        },
        ChildStdio {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
    ))
}

/// A pseudo-terminal; every descriptor is close-on-exec from the start so a
/// concurrent spawn cannot inherit it.
pub fn pty(size: Option<(u16, u16)>) -> Result<(ParentStdio, ChildStdio)> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| os("opening /dev/ptmx", e))?;
    grantpt(&master).map_err(|e| os("grantpt", e))?;
    unlockpt(&master).map_err(|e| os("unlockpt", e))?;
    let name = ptsname_r(&master).map_err(|e| os("ptsname", e))?;
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)
        .map_err(|e| os(format!("opening {name}"), e))?
        .into();
    // SAFETY: PtyMaster owns a valid fd; we take ownership of it.
    let master: OwnedFd = unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
            master,
        ))
    };
    if let Some((rows, cols)) = size {
        set_window_size(&master, rows, cols)?;
    }
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| os("duplicating a pty descriptor", e))
    };
    Ok((
        ParentStdio {
            stdin: dup(&master)?,
            stdout: dup(&master)?,
            stderr: None,
            tty: Some(master),
        },
        ChildStdio {
            stdin: dup(&slave)?,
            stdout: dup(&slave)?,
            stderr: slave,
        },
    ))
}

use std::os::unix::fs::OpenOptionsExt;

pub fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(precondition(format!(
            "setting the terminal size: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_survives_the_writer_and_ends_with_eof() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let buf = OutputBuffer::new(OUTPUT_BUFFER_LIMIT);
        let (tx, rx) = watch::channel(None);
        let pump = tokio::spawn(pump(r, buf.clone(), rx));
        // More than a pipe holds, written and closed before anyone reads.
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = std::thread::spawn({
            let p = payload.clone();
            move || {
                let mut f = std::fs::File::from(w);
                std::io::Write::write_all(&mut f, &p).unwrap();
            }
        });
        // Joined off the runtime: the pump must keep running meanwhile.
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        let _ = tx.send(Some(0)); // the pump may already be done (EOF)
        let mut got = Vec::new();
        loop {
            let chunk = buf.read(100_000).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 100_000);
            got.extend(chunk);
        }
        assert_eq!(got, payload);
        assert!(buf.eof_delivered());
        assert!(buf.read(10).await.is_empty(), "EOF is sticky");
        pump.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_buffer_is_back_pressure_not_loss() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let buf = OutputBuffer::new(1000);
        let (_tx, rx) = watch::channel(None);
        tokio::spawn(pump(r, buf.clone(), rx));
        let total = 200_000usize;
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(w);
            std::io::Write::write_all(&mut f, &vec![7u8; total]).unwrap();
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The pump stopped near the limit (one 64 KiB read may overshoot it).
        assert!(buf.buffered() <= 1000 + 64 * 1024, "{}", buf.buffered());
        let mut n = 0;
        loop {
            let c = buf.read(4096).await;
            if c.is_empty() {
                break;
            }
            n += c.len();
        }
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        assert_eq!(n, total);
    }

    #[tokio::test]
    async fn eof_after_exit_even_if_a_leftover_holds_the_pipe() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let buf = OutputBuffer::new(OUTPUT_BUFFER_LIMIT);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(pump(r, buf.clone(), rx));
        nix::unistd::write(&w, b"last words").unwrap();
        tx.send(Some(0)).unwrap();
        // `w` stays open, like a daemon the process left behind.
        let t0 = std::time::Instant::now();
        assert_eq!(buf.read(100).await, b"last words");
        assert!(buf.read(100).await.is_empty());
        assert!(t0.elapsed() >= EXIT_DRAIN / 2);
        drop(w);
    }

    #[tokio::test]
    async fn a_closed_stream_is_drained_from_the_start() {
        let b = OutputBuffer::closed();
        assert!(b.eof_delivered());
        assert!(b.read(10).await.is_empty());
    }

    #[tokio::test]
    async fn stdin_writer_and_pty_size() {
        let (parent, child) = pty(Some((33, 99))).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ fills the struct.
        let rc = unsafe { libc::ioctl(child.stdin.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 99));
        set_window_size(parent.tty.as_ref().unwrap(), 10, 20).unwrap();
        // SAFETY: TIOCGWINSZ fills the struct.
        let rc = unsafe { libc::ioctl(child.stdin.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (10, 20));

        let (p, c) = pipes(0).unwrap();
        let w = StdinWriter::new(p.stdin, false).unwrap();
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        nix::unistd::read(c.stdin.as_raw_fd(), &mut got).unwrap();
        assert_eq!(&got, b"hello");
    }
}
