//! kiln-seccomp: OCI seccomp profiles (`linux.seccomp`) as classic BPF programs.
//!
//! The front end ([`Profile::from_oci`]) and the back end ([`compile`],
//! [`install`]) are split as in rust-vmm's seccompiler; the crate knows
//! nothing of the agent, so other tools can compile the same profiles.
//!
//! [`Profile::from_oci`] validates the request's profile (actions, operators,
//! flags, architectures: bad ones are `InvalidArgument`, naming the value);
//! [`compile`] turns it into a filter for one architecture; [`install`] loads
//! it into the calling process (the container helper, right before exec).
//!
//! Semantics, following runc and libseccomp where the OCI spec is silent:
//! * Only the guest's own architecture is filtered. A syscall made through
//!   another ABI (i386 or x32 on x86_64, 31-bit on s390x) kills the process.
//! * Names unknown on the architecture (`arch_prctl` on aarch64, a syscall
//!   newer than our table) are skipped; the agent logs them at create time.
//! * Rules are tried in profile order, the first match wins; rules whose
//!   action equals the default action are dropped, as runc does.
//! * A rule's argument conditions must all hold, unless two of them name the
//!   same argument: then each is a rule of its own (either may match), as
//!   runc does for Docker's `personality` entries.
//! * `SCMP_ACT_ERRNO` returns `errnoRet`, else EPERM (the default action
//!   too: Kata's protocol has no `defaultErrnoRet`). `SCMP_ACT_TRACE`
//!   passes `errnoRet` to a tracer; the guest has none, so the kernel fails
//!   the call with ENOSYS. `SCMP_ACT_NOTIFY` needs a listener: refused.

use kiln_protocol::oci;

/// Why a profile was refused (the agent answers `INVALID_ARGUMENT` with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn invalid(message: impl Into<String>) -> Error {
    Error {
        message: message.into(),
    }
}

/// The kernel's limit on one filter (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// Syscall numbers are all below this on the four architectures (checked by a test).
const MAX_SYSCALL_NR: u32 = 1024;
/// x86_64's x32 ABI: syscall numbers with this bit set, under AUDIT_ARCH_X86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const EPERM: u16 = 1;
const MAX_ERRNO: u32 = 4095;

// seccomp return values (linux/seccomp.h).
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

// seccomp(2) flags.
const FLAG_TSYNC: u32 = 1;
const FLAG_LOG: u32 = 2;
const FLAG_SPEC_ALLOW: u32 = 4;
const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;

// Classic BPF opcodes (linux/filter.h).
const LD_W_ABS: u16 = 0x20;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const ALU_AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;

// Offsets in struct seccomp_data.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// One BPF instruction, laid out as `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The architectures kiln builds for: kiln-manifest's, one enum for the
/// whole project; [`SeccompArch`] adds what a filter needs to know of each.
pub use kiln_manifest::Arch;

/// Per-arch facts of seccomp: the audit arch, byte order, syscall table.
pub trait SeccompArch: Sized {
    /// The architecture this agent runs on, if it is one of the four.
    fn native() -> Option<Arch>;
    /// `seccomp_data.arch`.
    fn audit_arch(self) -> u32;
    /// seccomp_data's 64-bit arguments are in native byte order.
    fn big_endian(self) -> bool;
    /// Syscall number → name.
    fn syscall_name(self, nr: u32) -> Option<&'static str>;
    /// Name → number for this architecture, sorted by name.
    fn syscall_table(self) -> Vec<(&'static str, u32)>;
}

impl SeccompArch for Arch {
    fn native() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else if cfg!(all(target_arch = "powerpc64", target_endian = "little")) {
            Some(Arch::Ppc64le)
        } else if cfg!(target_arch = "s390x") {
            Some(Arch::S390x)
        } else {
            None
        }
    }

    /// AUDIT_ARCH_* = ELF machine | 64-bit | little-endian.
    fn audit_arch(self) -> u32 {
        const BIT64: u32 = 0x8000_0000;
        const LE: u32 = 0x4000_0000;
        match self {
            Arch::X86_64 => 62 | BIT64 | LE,   // EM_X86_64
            Arch::Aarch64 => 183 | BIT64 | LE, // EM_AARCH64
            Arch::Ppc64le => 21 | BIT64 | LE,  // EM_PPC64
            Arch::S390x => 22 | BIT64,         // EM_S390, big-endian
        }
    }

    fn big_endian(self) -> bool {
        self == Arch::S390x
    }

    /// Outside tests only the native table is linked: the agent never
    /// filters another architecture, and each table is ~12 KiB.
    fn syscall_name(self, nr: u32) -> Option<&'static str> {
        let nr = libc::c_long::from(nr);
        match self {
            #[cfg(any(test, target_arch = "x86_64"))]
            Arch::X86_64 => syscall_numbers::x86_64::sys_call_name(nr),
            #[cfg(any(test, target_arch = "aarch64"))]
            Arch::Aarch64 => syscall_numbers::aarch64::sys_call_name(nr),
            #[cfg(any(test, target_arch = "powerpc64"))]
            Arch::Ppc64le => syscall_numbers::powerpc64::sys_call_name(nr),
            #[cfg(any(test, target_arch = "s390x"))]
            Arch::S390x => syscall_numbers::s390x::sys_call_name(nr),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn syscall_table(self) -> Vec<(&'static str, u32)> {
        let mut t: Vec<_> = (0..MAX_SYSCALL_NR)
            .filter_map(|nr| Some((self.syscall_name(nr)?, nr)))
            .collect();
        t.sort_unstable();
        t
    }
}

/// `SCMP_ARCH_*` names the OCI spec may list; any other is refused.
const KNOWN_ARCHES: &[&str] = &[
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH",
    "SCMP_ARCH_SHEB",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Errno(u16),
    KillThread,
    KillProcess,
    Trap,
    Log,
    /// The message number for a tracer.
    Trace(u16),
}

impl Action {
    /// `field` names the action in messages (`Linux.Seccomp.Syscalls[3].Action`).
    fn parse(field: &str, name: &str, errno_ret: Option<u32>) -> Result<Action> {
        let data = || -> Result<u16> {
            match errno_ret {
                None => Ok(EPERM),
                Some(e) if e <= MAX_ERRNO => Ok(e as u16),
                Some(e) => Err(invalid(format!(
                    "{field} {name}: errnoRet {e} is out of range (at most {MAX_ERRNO})"
                ))),
            }
        };
        Ok(match name {
            "SCMP_ACT_ALLOW" => Action::Allow,
            "SCMP_ACT_ERRNO" => Action::Errno(data()?),
            // libseccomp's SCMP_ACT_KILL is the thread variant.
            "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
            "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
            "SCMP_ACT_TRAP" => Action::Trap,
            "SCMP_ACT_LOG" => Action::Log,
            "SCMP_ACT_TRACE" => Action::Trace(data()?),
            "SCMP_ACT_NOTIFY" => {
                return Err(invalid(format!(
                    "{field} SCMP_ACT_NOTIFY needs a seccomp notify listener, which kiln-agent does not support"
                )))
            }
            other => {
                return Err(invalid(format!(
                    "{field} {other:?} is unknown (SCMP_ACT_ALLOW, _ERRNO, _KILL, _KILL_THREAD, _KILL_PROCESS, _TRAP, _LOG, _TRACE)"
                )))
            }
        })
    }

    /// The filter's return value.
    pub fn ret(self) -> u32 {
        match self {
            Action::Allow => RET_ALLOW,
            Action::Errno(e) => RET_ERRNO | u32::from(e),
            Action::KillThread => RET_KILL_THREAD,
            Action::KillProcess => RET_KILL_PROCESS,
            Action::Trap => RET_TRAP,
            Action::Log => RET_LOG,
            Action::Trace(m) => RET_TRACE | u32::from(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    /// `(arg & value) == value_two`
    MaskedEq,
}

/// One argument condition; values are unsigned 64-bit, as in libseccomp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCmp {
    pub index: u8,
    pub op: CmpOp,
    pub value: u64,
    pub value_two: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub names: Vec<String>,
    pub action: Action,
    pub args: Vec<ArgCmp>,
}

/// A validated profile, independent of the architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub default_action: Action,
    /// `SECCOMP_FILTER_FLAG_*` bits for seccomp(2).
    pub flags: u32,
    pub rules: Vec<Rule>,
}

/// Bounds on work; the ttrpc frame limit bounds bytes.
const MAX_RULES: usize = 4096;
const MAX_NAMES: usize = 8192;

impl Profile {
    /// `None` for an absent or empty profile (no default action, no rules).
    pub fn from_oci(s: &oci::LinuxSeccomp) -> Result<Option<Profile>> {
        if s.DefaultAction.is_empty() && s.Syscalls.is_empty() {
            return Ok(None);
        }
        if s.DefaultAction.is_empty() {
            return Err(invalid(
                "Linux.Seccomp has syscall rules but no DefaultAction",
            ));
        }
        let default_action = Action::parse("Linux.Seccomp.DefaultAction", &s.DefaultAction, None)?;
        if let Some(a) = s
            .Architectures
            .iter()
            .find(|a| !KNOWN_ARCHES.contains(&a.as_str()))
        {
            return Err(invalid(format!(
                "Linux.Seccomp.Architectures entry {a:?} is unknown"
            )));
        }
        let mut flags = 0;
        for f in &s.Flags {
            flags |= match f.as_str() {
                "SECCOMP_FILTER_FLAG_TSYNC" => FLAG_TSYNC,
                "SECCOMP_FILTER_FLAG_LOG" => FLAG_LOG,
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => FLAG_SPEC_ALLOW,
                // Only changes how a notify listener waits; there is none.
                "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV" => 0,
                other => {
                    return Err(invalid(format!(
                        "Linux.Seccomp.Flags entry {other:?} is unknown"
                    )))
                }
            };
        }
        if s.Syscalls.len() > MAX_RULES {
            return Err(invalid(format!(
                "Linux.Seccomp has {} syscall rules; at most {MAX_RULES}",
                s.Syscalls.len()
            )));
        }
        let names: usize = s.Syscalls.iter().map(|r| r.Names.len()).sum();
        if names > MAX_NAMES {
            return Err(invalid(format!(
                "Linux.Seccomp names {names} syscalls; at most {MAX_NAMES}"
            )));
        }
        let mut rules = Vec::with_capacity(s.Syscalls.len());
        for (i, r) in s.Syscalls.iter().enumerate() {
            let what = format!("Linux.Seccomp.Syscalls[{i}]");
            if let Some(n) = r.Names.iter().find(|n| {
                n.is_empty()
                    || n.len() > 64
                    || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            }) {
                return Err(invalid(format!("{what} syscall name {n:?} is not valid")));
            }
            let errno_ret = r.has_errnoret().then(|| r.errnoret());
            let action = Action::parse(&format!("{what}.Action"), &r.Action, errno_ret)?;
            if r.Args.len() > 6 {
                return Err(invalid(format!(
                    "{what} has {} argument conditions; at most 6",
                    r.Args.len()
                )));
            }
            let args = r
                .Args
                .iter()
                .map(|a| ArgCmp::from_oci(&what, a))
                .collect::<Result<Vec<_>>>()?;
            rules.push(Rule {
                names: r.Names.clone(),
                action,
                args,
            });
        }
        Ok(Some(Profile {
            default_action,
            flags,
            rules,
        }))
    }
}

impl ArgCmp {
    fn from_oci(what: &str, a: &oci::LinuxSeccompArg) -> Result<ArgCmp> {
        if a.Index > 5 {
            return Err(invalid(format!(
                "{what} argument index {} is out of range (0..=5)",
                a.Index
            )));
        }
        let op = match a.Op.as_str() {
            "SCMP_CMP_NE" => CmpOp::Ne,
            "SCMP_CMP_LT" => CmpOp::Lt,
            "SCMP_CMP_LE" => CmpOp::Le,
            "SCMP_CMP_EQ" => CmpOp::Eq,
            "SCMP_CMP_GE" => CmpOp::Ge,
            "SCMP_CMP_GT" => CmpOp::Gt,
            "SCMP_CMP_MASKED_EQ" => CmpOp::MaskedEq,
            other => {
                return Err(invalid(format!(
                    "{what} argument operator {other:?} is unknown (SCMP_CMP_NE, _LT, _LE, _EQ, _GE, _GT, _MASKED_EQ)"
                )))
            }
        };
        Ok(ArgCmp {
            index: a.Index as u8,
            op,
            value: a.Value,
            value_two: a.ValueTwo,
        })
    }
}

/// A compiled filter for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub insns: Vec<Insn>,
    pub flags: u32,
    /// Names the architecture does not have; they were left out.
    pub skipped: Vec<String>,
}

/// Where a conditional jump goes, resolved once a rule's body is laid out.
#[derive(Debug, Clone, Copy)]
enum Tgt {
    /// The next instruction.
    Next,
    /// This condition holds: on to the next one (or the rule's RET).
    Pass,
    /// A condition failed: the rule does not match.
    Fail,
}

struct CondInsn {
    code: u16,
    k: u32,
    jt: Tgt,
    jf: Tgt,
}

fn cond_stmt(code: u16, k: u32) -> CondInsn {
    CondInsn {
        code,
        k,
        jt: Tgt::Next,
        jf: Tgt::Next,
    }
}

fn cond_jump(code: u16, k: u32, jt: Tgt, jf: Tgt) -> CondInsn {
    CondInsn { code, k, jt, jf }
}

/// One 64-bit argument condition as 32-bit BPF steps: the high words decide
/// unless they are equal, then the low words do.
fn compile_cmp(arch: Arch, c: &ArgCmp) -> Vec<CondInsn> {
    use Tgt::{Fail, Next, Pass};
    let base = DATA_ARGS + 8 * u32::from(c.index);
    let (hi_off, lo_off) = if arch.big_endian() {
        (base, base + 4)
    } else {
        (base + 4, base)
    };
    let (hi, lo) = ((c.value >> 32) as u32, c.value as u32);
    let ld_hi = cond_stmt(LD_W_ABS, hi_off);
    let ld_lo = cond_stmt(LD_W_ABS, lo_off);
    match c.op {
        CmpOp::Eq => vec![
            ld_hi,
            cond_jump(JMP_JEQ_K, hi, Next, Fail),
            ld_lo,
            cond_jump(JMP_JEQ_K, lo, Pass, Fail),
        ],
        CmpOp::Ne => vec![
            ld_hi,
            cond_jump(JMP_JEQ_K, hi, Next, Pass),
            ld_lo,
            cond_jump(JMP_JEQ_K, lo, Fail, Pass),
        ],
        CmpOp::Gt | CmpOp::Ge => vec![
            ld_hi,
            cond_jump(JMP_JGT_K, hi, Pass, Next),
            cond_jump(JMP_JEQ_K, hi, Next, Fail),
            ld_lo,
            if c.op == CmpOp::Gt {
                cond_jump(JMP_JGT_K, lo, Pass, Fail)
            } else {
                cond_jump(JMP_JGE_K, lo, Pass, Fail)
            },
        ],
        CmpOp::Lt | CmpOp::Le => vec![
            ld_hi,
            cond_jump(JMP_JGE_K, hi, Next, Pass),
            cond_jump(JMP_JEQ_K, hi, Next, Fail),
            ld_lo,
            if c.op == CmpOp::Lt {
                cond_jump(JMP_JGE_K, lo, Fail, Pass)
            } else {
                cond_jump(JMP_JGT_K, lo, Fail, Pass)
            },
        ],
        CmpOp::MaskedEq => {
            let (want_hi, want_lo) = ((c.value_two >> 32) as u32, c.value_two as u32);
            vec![
                ld_hi,
                cond_stmt(ALU_AND_K, hi),
                cond_jump(JMP_JEQ_K, want_hi, Next, Fail),
                ld_lo,
                cond_stmt(ALU_AND_K, lo),
                cond_jump(JMP_JEQ_K, want_lo, Pass, Fail),
            ]
        }
    }
}

/// `JEQ nr` then, when it matches, every condition and the action's RET;
/// a failed condition lands on a reload of the syscall number so the next
/// rule sees it in the accumulator again.
fn compile_conditional(arch: Arch, nr: u32, conds: &[ArgCmp], action: Action) -> Vec<Insn> {
    let mut body: Vec<CondInsn> = Vec::new();
    let mut cond_ends = Vec::new();
    for c in conds {
        body.extend(compile_cmp(arch, c));
        cond_ends.push(body.len());
    }
    // Index of the reload (the Fail target) inside the body, after the RET.
    let reload = body.len() + 1;
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(Insn {
        code: JMP_JEQ_K,
        jt: 0,
        jf: (reload + 1) as u8,
        k: nr,
    });
    let mut cond = 0;
    for (i, ins) in body.iter().enumerate() {
        while cond_ends[cond] <= i {
            cond += 1;
        }
        let off = |t: Tgt| -> u8 {
            let target = match t {
                Tgt::Next => i + 1,
                Tgt::Pass => cond_ends[cond],
                Tgt::Fail => reload,
            };
            (target - i - 1) as u8
        };
        out.push(Insn {
            code: ins.code,
            jt: off(ins.jt),
            jf: off(ins.jf),
            k: ins.k,
        });
    }
    out.push(stmt(RET_K, action.ret()));
    out.push(stmt(LD_W_ABS, DATA_NR));
    out
}

/// The profile as a filter for `arch`. Errors only when it is too large for
/// the kernel.
pub fn compile(p: &Profile, arch: Arch) -> Result<Filter> {
    let table = arch.syscall_table();
    let lookup = |name: &str| {
        table
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| table[i].1)
    };
    let mut insns = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        Insn {
            code: JMP_JEQ_K,
            jt: 1,
            jf: 0,
            k: arch.audit_arch(),
        },
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    if arch == Arch::X86_64 {
        insns.push(Insn {
            code: JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        });
        insns.push(stmt(RET_K, RET_KILL_PROCESS));
    }
    let mut skipped: Vec<String> = Vec::new();
    // Syscalls already decided by an unconditional rule: later rules for them
    // could never match.
    let mut decided = std::collections::HashSet::new();
    for rule in &p.rules {
        if rule.action == p.default_action {
            continue;
        }
        for name in &rule.names {
            let Some(nr) = lookup(name) else {
                if !skipped.contains(name) {
                    skipped.push(name.clone());
                }
                continue;
            };
            if decided.contains(&nr) {
                continue;
            }
            if rule.args.is_empty() {
                decided.insert(nr);
                insns.push(Insn {
                    code: JMP_JEQ_K,
                    jt: 0,
                    jf: 1,
                    k: nr,
                });
                insns.push(stmt(RET_K, rule.action.ret()));
            } else if repeats_an_index(&rule.args) {
                for c in &rule.args {
                    insns.extend(compile_conditional(
                        arch,
                        nr,
                        std::slice::from_ref(c),
                        rule.action,
                    ));
                }
            } else {
                insns.extend(compile_conditional(arch, nr, &rule.args, rule.action));
            }
            if insns.len() > MAX_INSNS {
                break;
            }
        }
    }
    insns.push(stmt(RET_K, p.default_action.ret()));
    if insns.len() > MAX_INSNS {
        return Err(invalid(format!(
            "Linux.Seccomp compiles to more than {MAX_INSNS} BPF instructions on {}, the kernel's limit",
            arch.name()
        )));
    }
    Ok(Filter {
        insns,
        flags: p.flags,
        skipped,
    })
}

fn repeats_an_index(args: &[ArgCmp]) -> bool {
    args.iter()
        .enumerate()
        .any(|(i, a)| args[..i].iter().any(|b| b.index == a.index))
}

/// Installs `f` in the calling thread (and, with TSYNC, its siblings). The
/// kernel wants no_new_privs set or CAP_SYS_ADMIN; the caller arranges that.
pub fn install(f: &Filter) -> std::result::Result<(), String> {
    let mut prog: Vec<libc::sock_filter> = f
        .insns
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: seccomp(2) reads `fprog` and the instructions it points to,
    // both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            f.flags as libc::c_uint,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(format!(
            "installing the seccomp filter ({} instructions, flags {:#x}): {}",
            prog.len(),
            f.flags,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether the running kernel takes seccomp filters (CONFIG_SECCOMP_FILTER).
/// Asking it to install from a NULL program is refused with EFAULT when
/// filters are supported (the copy fails), EINVAL when they are not, ENOSYS
/// without seccomp at all; nothing is installed either way.
pub fn kernel_supports_filters() -> bool {
    // SAFETY: a NULL program is never dereferenced by user space; the
    // kernel's copy from it fails.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            std::ptr::null::<libc::sock_fprog>(),
        )
    };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Arch; 4] = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::S390x];

    /// `struct seccomp_data` as the kernel fills it for `arch`.
    fn data(arch: Arch, audit: u32, nr: u32, args: [u64; 6]) -> Vec<u8> {
        let mut d = Vec::with_capacity(64);
        let w32 = |v: u32| {
            if arch.big_endian() {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        d.extend(w32(nr));
        d.extend(w32(audit));
        d.extend([0u8; 8]);
        for a in args {
            d.extend(if arch.big_endian() {
                a.to_be_bytes()
            } else {
                a.to_le_bytes()
            });
        }
        d
    }

    /// A classic BPF interpreter for the instructions the compiler emits,
    /// reading words in `arch`'s byte order as the kernel does.
    fn run(arch: Arch, prog: &[Insn], d: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let w: [u8; 4] = d[i.k as usize..i.k as usize + 4].try_into().unwrap();
                    a = if arch.big_endian() {
                        u32::from_be_bytes(w)
                    } else {
                        u32::from_le_bytes(w)
                    };
                }
                ALU_AND_K => a &= i.k,
                RET_K => return i.k,
                JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => {
                    let taken = match i.code {
                        JMP_JEQ_K => a == i.k,
                        JMP_JGT_K => a > i.k,
                        _ => a >= i.k,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn eval(arch: Arch, f: &Filter, name: &str, args: [u64; 6]) -> u32 {
        let nr = arch
            .syscall_table()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} on {arch:?}"))
            .1;
        run(arch, &f.insns, &data(arch, arch.audit_arch(), nr, args))
    }

    fn rule(names: &[&str], action: &str, errno: Option<u32>) -> oci::LinuxSyscall {
        let mut r = oci::LinuxSyscall::new();
        r.Names = names.iter().map(|s| s.to_string()).collect();
        r.Action = action.into();
        if let Some(e) = errno {
            r.set_errnoret(e);
        }
        r
    }

    fn arg(index: u64, op: &str, value: u64, value_two: u64) -> oci::LinuxSeccompArg {
        let mut a = oci::LinuxSeccompArg::new();
        a.Index = index;
        a.Op = op.into();
        a.Value = value;
        a.ValueTwo = value_two;
        a
    }

    fn profile(default: &str, rules: Vec<oci::LinuxSyscall>) -> oci::LinuxSeccomp {
        let mut s = oci::LinuxSeccomp::new();
        s.DefaultAction = default.into();
        s.Architectures = vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_AARCH64".into()];
        s.Syscalls = rules;
        s
    }

    fn parse(s: &oci::LinuxSeccomp) -> Profile {
        Profile::from_oci(s).unwrap().unwrap()
    }

    #[test]
    fn syscall_numbers_per_arch() {
        let nr = |arch: Arch, name: &str| {
            arch.syscall_table()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, nr)| nr)
        };
        assert_eq!(nr(Arch::X86_64, "mkdirat"), Some(258));
        assert_eq!(nr(Arch::X86_64, "mkdir"), Some(83));
        assert_eq!(nr(Arch::X86_64, "arch_prctl"), Some(158));
        assert_eq!(nr(Arch::Aarch64, "mkdirat"), Some(34));
        assert_eq!(nr(Arch::Aarch64, "mkdir"), None, "aarch64 has only mkdirat");
        assert_eq!(nr(Arch::Ppc64le, "mkdirat"), Some(287));
        assert_eq!(nr(Arch::S390x, "mkdirat"), Some(289));
        assert_eq!(nr(Arch::S390x, "mkdir"), Some(39));
        for arch in ALL {
            assert_eq!(
                nr(arch, "openat2"),
                Some(437),
                "{arch:?}: unified numbers since 5.x"
            );
            assert!(
                arch.syscall_name(MAX_SYSCALL_NR).is_none()
                    && (MAX_SYSCALL_NR..MAX_SYSCALL_NR + 64)
                        .all(|n| arch.syscall_name(n).is_none()),
                "{arch:?}: the table scan covers every syscall"
            );
        }
        assert_eq!(Arch::X86_64.audit_arch(), 0xc000_003e);
        assert_eq!(Arch::Aarch64.audit_arch(), 0xc000_00b7);
        assert_eq!(Arch::Ppc64le.audit_arch(), 0xc000_0015);
        assert_eq!(Arch::S390x.audit_arch(), 0x8000_0016);
    }

    #[test]
    fn small_profile_has_the_expected_instructions() {
        let s = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["mkdirat", "no_such_call"], "SCMP_ACT_ERRNO", None)],
        );
        let f = compile(&parse(&s), Arch::Aarch64).unwrap();
        assert_eq!(f.skipped, ["no_such_call"]);
        let expected = [
            stmt(LD_W_ABS, 4),
            Insn {
                code: JMP_JEQ_K,
                jt: 1,
                jf: 0,
                k: 0xc000_00b7,
            },
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_W_ABS, 0),
            Insn {
                code: JMP_JEQ_K,
                jt: 0,
                jf: 1,
                k: 34,
            },
            stmt(RET_K, 0x0005_0001),
            stmt(RET_K, RET_ALLOW),
        ];
        assert_eq!(f.insns, expected);
        // x86_64 also kills x32 calls, right after loading the number.
        let f = compile(&parse(&s), Arch::X86_64).unwrap();
        assert_eq!(
            f.insns[4],
            Insn {
                code: JMP_JGE_K,
                jt: 0,
                jf: 1,
                k: X32_SYSCALL_BIT
            }
        );
        assert_eq!(f.insns[5], stmt(RET_K, RET_KILL_PROCESS));
    }

    #[test]
    fn actions_and_wrong_arch() {
        let s = profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(&["read", "write"], "SCMP_ACT_ALLOW", None),
                rule(&["mkdirat"], "SCMP_ACT_ERRNO", Some(13)),
                rule(&["kill"], "SCMP_ACT_KILL", None),
                rule(&["tkill"], "SCMP_ACT_KILL_PROCESS", None),
                rule(&["getpid"], "SCMP_ACT_TRAP", None),
                rule(&["getuid"], "SCMP_ACT_LOG", None),
                rule(&["getgid"], "SCMP_ACT_TRACE", Some(7)),
                // The same action as the default: dropped, as runc does.
                rule(&["read"], "SCMP_ACT_ERRNO", None),
            ],
        );
        let p = parse(&s);
        for arch in ALL {
            let f = compile(&p, arch).unwrap();
            let e = |n| eval(arch, &f, n, [0; 6]);
            assert_eq!(e("read"), RET_ALLOW);
            assert_eq!(e("write"), RET_ALLOW);
            assert_eq!(e("mkdirat"), RET_ERRNO | 13);
            assert_eq!(e("kill"), RET_KILL_THREAD);
            assert_eq!(e("tkill"), RET_KILL_PROCESS);
            assert_eq!(e("getpid"), RET_TRAP);
            assert_eq!(e("getuid"), RET_LOG);
            assert_eq!(e("getgid"), RET_TRACE | 7);
            assert_eq!(e("close"), RET_ERRNO | 1, "default errno is EPERM");
            let other = if arch == Arch::S390x {
                Arch::X86_64
            } else {
                Arch::S390x
            };
            assert_eq!(
                run(arch, &f.insns, &data(arch, other.audit_arch(), 0, [0; 6])),
                RET_KILL_PROCESS,
                "{arch:?}: another architecture's calls kill"
            );
        }
        let f = compile(&p, Arch::X86_64).unwrap();
        assert_eq!(
            run(
                Arch::X86_64,
                &f.insns,
                &data(
                    Arch::X86_64,
                    Arch::X86_64.audit_arch(),
                    X32_SYSCALL_BIT,
                    [0; 6]
                )
            ),
            RET_KILL_PROCESS,
            "x32 calls kill"
        );
    }

    #[test]
    fn argument_operators_compare_all_64_bits() {
        let values: [u64; 9] = [
            0,
            1,
            0xffff_ffff,
            0x1_0000_0000,
            0x1_0000_0001,
            0x2_0000_0000,
            0x1_ffff_ffff,
            u64::MAX - 1,
            u64::MAX,
        ];
        /// (argument, value, value_two) → does the condition hold?
        type Truth = fn(u64, u64, u64) -> bool;
        let ops: [(&str, Truth); 7] = [
            ("SCMP_CMP_EQ", |a, v, _| a == v),
            ("SCMP_CMP_NE", |a, v, _| a != v),
            ("SCMP_CMP_LT", |a, v, _| a < v),
            ("SCMP_CMP_LE", |a, v, _| a <= v),
            ("SCMP_CMP_GT", |a, v, _| a > v),
            ("SCMP_CMP_GE", |a, v, _| a >= v),
            ("SCMP_CMP_MASKED_EQ", |a, m, w| a & m == w),
        ];
        for arch in ALL {
            for (op, truth) in ops {
                for &v in &values {
                    let v2 = v & 0x1_0000_00f0;
                    let s = profile(
                        "SCMP_ACT_ALLOW",
                        vec![{
                            let mut r = rule(&["ioctl"], "SCMP_ACT_ERRNO", Some(22));
                            r.Args = vec![arg(3, op, v, v2)];
                            r
                        }],
                    );
                    let f = compile(&parse(&s), arch).unwrap();
                    for &a in &values {
                        let got = eval(arch, &f, "ioctl", [0, 0, 0, a, 0, 0]);
                        let want = if truth(a, v, v2) {
                            RET_ERRNO | 22
                        } else {
                            RET_ALLOW
                        };
                        assert_eq!(got, want, "{arch:?} arg {a:#x} {op} {v:#x} ({v2:#x})");
                    }
                }
            }
        }
    }

    #[test]
    fn conditions_and_unless_an_index_repeats() {
        // Different indexes: all must hold.
        let mut both = rule(&["socket"], "SCMP_ACT_ERRNO", None);
        both.Args = vec![arg(0, "SCMP_CMP_EQ", 2, 0), arg(1, "SCMP_CMP_EQ", 3, 0)];
        // The same index twice (Docker's personality entries): either may match.
        let mut either = rule(&["personality"], "SCMP_ACT_ALLOW", None);
        either.Args = vec![arg(0, "SCMP_CMP_EQ", 0, 0), arg(0, "SCMP_CMP_EQ", 8, 0)];
        let p1 = parse(&profile("SCMP_ACT_ALLOW", vec![both]));
        let p2 = parse(&profile("SCMP_ACT_KILL_PROCESS", vec![either]));
        for arch in ALL {
            let f = compile(&p1, arch).unwrap();
            assert_eq!(eval(arch, &f, "socket", [2, 3, 0, 0, 0, 0]), RET_ERRNO | 1);
            assert_eq!(eval(arch, &f, "socket", [2, 1, 0, 0, 0, 0]), RET_ALLOW);
            assert_eq!(eval(arch, &f, "socket", [10, 3, 0, 0, 0, 0]), RET_ALLOW);
            assert_eq!(eval(arch, &f, "close", [2, 3, 0, 0, 0, 0]), RET_ALLOW);
            let f = compile(&p2, arch).unwrap();
            assert_eq!(eval(arch, &f, "personality", [0; 6]), RET_ALLOW);
            assert_eq!(eval(arch, &f, "personality", [8, 0, 0, 0, 0, 0]), RET_ALLOW);
            assert_eq!(
                eval(arch, &f, "personality", [4, 0, 0, 0, 0, 0]),
                RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let mut cond = rule(&["openat"], "SCMP_ACT_ERRNO", Some(13));
        cond.Args = vec![arg(2, "SCMP_CMP_MASKED_EQ", 3, 1)];
        let p = parse(&profile(
            "SCMP_ACT_ALLOW",
            vec![
                cond,
                rule(&["openat", "mkdirat"], "SCMP_ACT_ERRNO", Some(30)),
                rule(&["mkdirat"], "SCMP_ACT_KILL", None),
            ],
        ));
        for arch in ALL {
            let f = compile(&p, arch).unwrap();
            assert_eq!(eval(arch, &f, "openat", [0, 0, 1, 0, 0, 0]), RET_ERRNO | 13);
            assert_eq!(eval(arch, &f, "openat", [0, 0, 0, 0, 0, 0]), RET_ERRNO | 30);
            assert_eq!(eval(arch, &f, "mkdirat", [0; 6]), RET_ERRNO | 30);
        }
    }

    #[test]
    fn bad_profiles_name_the_value() {
        let cases: Vec<(oci::LinuxSeccomp, &str)> = vec![
            (profile("SCMP_ACT_FLY", vec![]), "SCMP_ACT_FLY"),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![rule(&["read"], "SCMP_ACT_NOPE", None)],
                ),
                "Syscalls[0].Action \"SCMP_ACT_NOPE\" is unknown",
            ),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![rule(&["read"], "SCMP_ACT_NOTIFY", None)],
                ),
                "SCMP_ACT_NOTIFY",
            ),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![rule(&["read"], "SCMP_ACT_ERRNO", Some(70000))],
                ),
                "errnoRet 70000",
            ),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![rule(&["re/ad"], "SCMP_ACT_ERRNO", None)],
                ),
                "re/ad",
            ),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![{
                        let mut r = rule(&["read"], "SCMP_ACT_ERRNO", None);
                        r.Args = vec![arg(0, "SCMP_CMP_ABOUT", 1, 0)];
                        r
                    }],
                ),
                "SCMP_CMP_ABOUT",
            ),
            (
                profile(
                    "SCMP_ACT_ALLOW",
                    vec![{
                        let mut r = rule(&["read"], "SCMP_ACT_ERRNO", None);
                        r.Args = vec![arg(6, "SCMP_CMP_EQ", 1, 0)];
                        r
                    }],
                ),
                "index 6",
            ),
            (
                {
                    let mut s = profile("SCMP_ACT_ALLOW", vec![]);
                    s.Flags = vec!["SECCOMP_FILTER_FLAG_NEW_LISTENER".into()];
                    s
                },
                "NEW_LISTENER",
            ),
            (
                {
                    let mut s = profile("SCMP_ACT_ALLOW", vec![]);
                    s.Architectures = vec!["SCMP_ARCH_VAX".into()];
                    s
                },
                "SCMP_ARCH_VAX",
            ),
            (
                profile("", vec![rule(&["read"], "SCMP_ACT_ERRNO", None)]),
                "no DefaultAction",
            ),
        ];
        for (s, needle) in cases {
            let e = Profile::from_oci(&s).unwrap_err();
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        assert_eq!(Profile::from_oci(&oci::LinuxSeccomp::new()).unwrap(), None);
    }

    #[test]
    fn flags_and_size_limit() {
        let mut s = profile("SCMP_ACT_ALLOW", vec![]);
        s.Flags = vec![
            "SECCOMP_FILTER_FLAG_LOG".into(),
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW".into(),
        ];
        assert_eq!(parse(&s).flags, FLAG_LOG | FLAG_SPEC_ALLOW);
        // 700 conditional rules of ~30 instructions each: too many for the kernel.
        let mut r = rule(&["ioctl"], "SCMP_ACT_ERRNO", None);
        r.Args = (0..6).map(|i| arg(i, "SCMP_CMP_MASKED_EQ", 1, 1)).collect();
        let big = profile("SCMP_ACT_ALLOW", vec![r; 700]);
        let e = compile(&parse(&big), Arch::X86_64).unwrap_err();
        assert!(e.message.contains("4096"), "{}", e.message);
    }

    /// Installs a filter in a forked child and watches it work: mkdirat is
    /// denied with EPERM, umask(0o777) with EACCES, other calls go through.
    #[test]
    fn installed_filter_denies_in_a_forked_child() {
        let Some(arch) = Arch::native() else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut umask = rule(&["umask"], "SCMP_ACT_ERRNO", Some(13));
        umask.Args = vec![arg(0, "SCMP_CMP_EQ", 0o777, 0)];
        let s = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["mkdir", "mkdirat"], "SCMP_ACT_ERRNO", None), umask],
        );
        let f = compile(&parse(&s), arch).unwrap();
        let denied =
            std::ffi::CString::new(dir.path().join("denied").as_os_str().as_encoded_bytes())
                .unwrap();
        // SAFETY: the child only makes raw syscalls (no allocation, no locks)
        // and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // Child: exit code says which step went wrong (0 = all as expected).
            // SAFETY: raw syscalls on locals only, then _exit (see the fork above).
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(10);
                }
                let mut prog: [libc::sock_filter; 64] = [libc::sock_filter {
                    code: 0,
                    jt: 0,
                    jf: 0,
                    k: 0,
                }; 64];
                if f.insns.len() > prog.len() {
                    libc::_exit(11);
                }
                for (d, i) in prog.iter_mut().zip(&f.insns) {
                    *d = libc::sock_filter {
                        code: i.code,
                        jt: i.jt,
                        jf: i.jf,
                        k: i.k,
                    };
                }
                let fprog = libc::sock_fprog {
                    len: f.insns.len() as libc::c_ushort,
                    filter: prog.as_mut_ptr(),
                };
                if libc::syscall(libc::SYS_seccomp, 1, 0, &fprog as *const libc::sock_fprog) != 0 {
                    libc::_exit(12);
                }
                let rc = libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, denied.as_ptr(), 0o755);
                if rc != -1 || *libc::__errno_location() != libc::EPERM {
                    libc::_exit(13);
                }
                let rc = libc::syscall(libc::SYS_umask, 0o777);
                if rc != -1 || *libc::__errno_location() != libc::EACCES {
                    libc::_exit(14);
                }
                if libc::syscall(libc::SYS_umask, 0o022) < 0 || libc::getpid() <= 0 {
                    libc::_exit(15);
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x} (exit code = failed step)"
        );
        assert!(!dir.path().join("denied").exists(), "mkdirat was denied");
        assert!(kernel_supports_filters(), "this kernel took the filter");
    }
}
