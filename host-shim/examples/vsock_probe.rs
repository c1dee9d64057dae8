//! What a hostile container tries against the agent's vsock port
//! (`tests/agent_vm.rs` builds it statically for the guest and runs it in a
//! container): `vsock_probe CID:PORT...` connects to each address, sends a
//! ttrpc `grpc.Health/Check` request and waits up to 5 s for any answer.
//! Prints one line per address: `CID:PORT connect=<ok|error> answer=<...>`,
//! where a reached agent shows as `answer=ttrpc`. No dependencies, so plain
//! `rustc` builds it.

use std::os::raw::{c_int, c_void};

extern "C" {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const c_void, len: u32) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: u32) -> c_int;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
}

const AF_VSOCK: c_int = 40;
const SOCK_STREAM: c_int = 1;
const SOL_SOCKET: c_int = 1;
// x86_64 and aarch64 (asm-generic); the test builds for x86_64 only.
const SO_RCVTIMEO: c_int = 20;

/// `struct sockaddr_vm` (<linux/vm_sockets.h>).
#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

fn os_error() -> String {
    std::io::Error::last_os_error().to_string()
}

/// A protobuf length-delimited field.
fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// One ttrpc request frame: `grpc.Health/Check` with an empty CheckRequest
/// (header: length and stream id big-endian, type 1 = request, flags 0).
fn check_request() -> Vec<u8> {
    let mut body = field(0x0a, b"grpc.Health");
    body.extend(field(0x12, b"Check"));
    body.extend([0x1a, 0]);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(1u32.to_be_bytes());
    frame.extend([1, 0]);
    frame.extend(body);
    frame
}

fn probe(cid: u32, port: u32) -> String {
    // SAFETY: plain syscalls on a socket this function owns; every pointer
    // is to a live local of the size passed.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if fd < 0 {
            return format!("socket={}", os_error());
        }
        let addr = SockaddrVm {
            family: AF_VSOCK as u16,
            reserved1: 0,
            port,
            cid,
            flags: 0,
            zero: [0; 3],
        };
        let size = std::mem::size_of::<SockaddrVm>() as u32;
        if connect(fd, std::ptr::from_ref(&addr).cast::<c_void>(), size) < 0 {
            let e = os_error();
            close(fd);
            return format!("connect=({e})");
        }
        let tv = Timeval { sec: 5, usec: 0 };
        let tv_size = std::mem::size_of::<Timeval>() as u32;
        setsockopt(
            fd,
            SOL_SOCKET,
            SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast::<c_void>(),
            tv_size,
        );
        let req = check_request();
        let sent = write(fd, req.as_ptr().cast::<c_void>(), req.len());
        let mut buf = [0u8; 256];
        let got = read(fd, buf.as_mut_ptr().cast::<c_void>(), buf.len());
        let answer = match got {
            n if n < 0 => format!("({})", os_error()),
            0 => "eof".to_string(),
            // ttrpc response frames have type 2 at byte 8.
            n if n >= 10 && buf[8] == 2 => "ttrpc".to_string(),
            n => format!("{n}-bytes"),
        };
        close(fd);
        format!("connect=ok sent={sent} answer={answer}")
    }
}

fn main() {
    for target in std::env::args().skip(1) {
        let parsed = target
            .split_once(':')
            .and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)));
        match parsed {
            Some((cid, port)) => println!("{target} {}", probe(cid, port)),
            None => println!("{target} bad-address"),
        }
    }
}
