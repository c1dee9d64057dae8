//! The agent ↔ container-helper messages, over a unix stream socket that the
//! helper finds as fd 3. Frames are a big-endian u32 length and a body whose
//! first byte says what it is. The OCI spec travels as the protobuf it came in.

use std::io::{Read, Write};
use std::path::PathBuf;

use kiln_protocol::oci;
use protobuf::Message;

/// The helper's fd for the control socket.
pub const CONTROL_FD: i32 = 3;
/// argv[1] that turns the agent binary into the container helper.
pub const HELPER_ARG: &str = "--kiln-container-helper";
/// Largest frame accepted (the spec is bounded by the ttrpc frame anyway).
const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchKind {
    /// A container's first process: new namespaces, rootfs, mounts.
    Init,
    /// An extra process joining the namespaces of `join_pid`.
    Exec,
}

/// Agent → helper, first message.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kind: LaunchKind,
    /// chroot instead of pivot_root (the guest's initramfs cannot be pivoted away).
    pub no_pivot: bool,
    /// For Exec: the container init whose namespaces to join.
    pub join_pid: i32,
    /// cgroup directory to join before forking, if any.
    pub cgroup: Option<PathBuf>,
    /// The resolved spec: absolute rootfs, namespace paths to join filled in.
    pub spec: oci::Spec,
}

/// Helper → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The process that will exec, as seen from the agent.
    Pid(i32),
    /// Set up; waiting for Start.
    Ready,
    Error(String),
}

pub const START: &[u8] = b"S";

pub fn encode_config(c: &Config) -> Result<Vec<u8>, String> {
    let spec = c
        .spec
        .write_to_bytes()
        .map_err(|e| format!("encoding the OCI spec: {e}"))?;
    let cg = c
        .cgroup
        .as_ref()
        .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(12 + cg.len() + spec.len());
    out.push(b'C');
    out.push(match c.kind {
        LaunchKind::Init => 0,
        LaunchKind::Exec => 1,
    });
    out.push(c.no_pivot as u8);
    out.extend(c.join_pid.to_be_bytes());
    out.extend((cg.len() as u32).to_be_bytes());
    out.extend(&cg);
    out.extend(spec);
    Ok(out)
}

pub fn decode_config(b: &[u8]) -> Result<Config, String> {
    let bad = || "malformed helper config frame".to_string();
    if b.len() < 11 || b[0] != b'C' {
        return Err(bad());
    }
    let kind = match b[1] {
        0 => LaunchKind::Init,
        1 => LaunchKind::Exec,
        _ => return Err(bad()),
    };
    let no_pivot = b[2] != 0;
    let join_pid = i32::from_be_bytes(b[3..7].try_into().map_err(|_| bad())?);
    let cg_len = u32::from_be_bytes(b[7..11].try_into().map_err(|_| bad())?) as usize;
    let cg = b.get(11..11 + cg_len).ok_or_else(bad)?;
    let cgroup = (!cg.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(cg).into_owned()));
    let spec = oci::Spec::parse_from_bytes(&b[11 + cg_len..])
        .map_err(|e| format!("decoding the OCI spec: {e}"))?;
    Ok(Config {
        kind,
        no_pivot,
        join_pid,
        cgroup,
        spec,
    })
}

pub fn encode_report(r: &Report) -> Vec<u8> {
    match r {
        Report::Pid(p) => {
            let mut v = vec![b'P'];
            v.extend(p.to_be_bytes());
            v
        }
        Report::Ready => vec![b'R'],
        Report::Error(m) => {
            let mut v = vec![b'E'];
            v.extend(m.as_bytes().iter().take(64 * 1024));
            v
        }
    }
}

pub fn decode_report(b: &[u8]) -> Result<Report, String> {
    match b.split_first() {
        Some((b'P', rest)) if rest.len() == 4 => Ok(Report::Pid(i32::from_be_bytes([
            rest[0], rest[1], rest[2], rest[3],
        ]))),
        Some((b'R', [])) => Ok(Report::Ready),
        Some((b'E', rest)) => Ok(Report::Error(String::from_utf8_lossy(rest).into_owned())),
        _ => Err("malformed message from the container helper".into()),
    }
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend((body.len() as u32).to_be_bytes());
    v.extend(body);
    v
}

/// Blocking frame I/O for the helper side. `Ok(None)` is a clean EOF.
pub fn read_frame_blocking(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

pub fn write_frame_blocking(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&frame(body))
}

/// Async frame read for the agent side. `Ok(None)` is a clean EOF.
pub async fn read_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips() {
        let mut spec = oci::Spec::new();
        spec.Hostname = "box".into();
        let c = Config {
            kind: LaunchKind::Exec,
            no_pivot: true,
            join_pid: 4242,
            cgroup: Some("/sys/fs/cgroup/kiln/s/c".into()),
            spec,
        };
        let back = decode_config(&encode_config(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let c2 = Config {
            kind: LaunchKind::Init,
            no_pivot: false,
            join_pid: 0,
            cgroup: None,
            spec: oci::Spec::new(),
        };
        assert_eq!(decode_config(&encode_config(&c2).unwrap()).unwrap(), c2);
    }

    #[test]
    fn reports_round_trip_and_garbage_is_rejected() {
        for r in [
            Report::Pid(77),
            Report::Ready,
            Report::Error("mount failed".into()),
        ] {
            assert_eq!(decode_report(&encode_report(&r)).unwrap(), r);
        }
        assert!(decode_report(b"").is_err());
        assert!(decode_report(b"P12").is_err());
        assert!(decode_config(b"C\x07").is_err());
        assert!(decode_config(b"C\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn frames_round_trip_and_eof_is_none() {
        let mut buf = Vec::new();
        write_frame_blocking(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame_blocking(&mut r).unwrap().unwrap(), b"abc");
        assert!(read_frame_blocking(&mut r).unwrap().is_none());
    }
}
