//! The guest architectures kiln builds for: [`Arch`] and its pure facts
//! live in kiln-manifest (shared with kiln-shim); this module adds what only
//! the build host needs (cross compilers and their Debian packages) and the
//! `--arch` selection.

use std::str::FromStr;

pub use kiln_manifest::arch::{Arch, ALL};

/// Per-arch facts of the build host's cross toolchain.
pub trait CrossTools {
    /// `CROSS_COMPILE=` prefix, or None when building on the same arch.
    fn cross_prefix(self) -> Option<&'static str>;
    /// Debian package providing the cross compiler (None for the host arch).
    fn cross_gcc_package(self) -> Option<&'static str>;
    /// Debian package with the target's C library for the agent's static link
    /// (None where rustc's self-contained musl CRT needs no system libc).
    fn cross_libc_package(self) -> Option<&'static str>;
    /// Debian package with the target's C library for static C programs (the
    /// workload container rootfs's `programs`); None for the host arch.
    fn cross_c_program_libc_package(self) -> Option<&'static str>;
}

impl CrossTools for Arch {
    fn cross_prefix(self) -> Option<&'static str> {
        if self == Arch::host() {
            return None;
        }
        Some(match self {
            Arch::X86_64 => "x86_64-linux-gnu-",
            Arch::Aarch64 => "aarch64-linux-gnu-",
            Arch::Ppc64le => "powerpc64le-linux-gnu-",
            Arch::S390x => "s390x-linux-gnu-",
        })
    }

    fn cross_gcc_package(self) -> Option<&'static str> {
        self.cross_prefix().map(|_| match self {
            Arch::X86_64 => "gcc-x86-64-linux-gnu",
            Arch::Aarch64 => "gcc-aarch64-linux-gnu",
            Arch::Ppc64le => "gcc-powerpc64le-linux-gnu",
            Arch::S390x => "gcc-s390x-linux-gnu",
        })
    }

    fn cross_libc_package(self) -> Option<&'static str> {
        self.cross_prefix()?;
        match self {
            // +crt-static glibc: the cross gcc links libc.a, libpthread.a... from here.
            Arch::Ppc64le => Some("libc6-dev-ppc64el-cross"),
            Arch::S390x => Some("libc6-dev-s390x-cross"),
            // musl: rustc ships crt objects and libc.a; the cross gcc only drives the link.
            Arch::X86_64 | Arch::Aarch64 => None,
        }
    }

    fn cross_c_program_libc_package(self) -> Option<&'static str> {
        self.cross_prefix()?;
        Some(match self {
            Arch::X86_64 => "libc6-dev-amd64-cross",
            Arch::Aarch64 => "libc6-dev-arm64-cross",
            Arch::Ppc64le => "libc6-dev-ppc64el-cross",
            Arch::S390x => "libc6-dev-s390x-cross",
        })
    }
}

/// `--arch` value: one architecture or `all`.
#[derive(Clone, Copy, Debug)]
pub enum ArchSel {
    One(Arch),
    All,
}

impl FromStr for ArchSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            Ok(ArchSel::All)
        } else {
            s.parse().map(ArchSel::One)
        }
    }
}

impl ArchSel {
    pub fn arches(self) -> Vec<Arch> {
        match self {
            ArchSel::One(a) => vec![a],
            ArchSel::All => ALL.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_selects_every_arch() {
        assert!(matches!("all".parse::<ArchSel>().unwrap(), ArchSel::All));
        assert_eq!("all".parse::<ArchSel>().unwrap().arches(), ALL.to_vec());
        assert!("mips".parse::<ArchSel>().is_err());
    }

    #[test]
    fn no_cross_tools_for_the_host() {
        assert_eq!(Arch::host().cross_prefix(), None);
        assert_eq!(Arch::host().cross_gcc_package(), None);
        let other = ALL.into_iter().find(|a| *a != Arch::host()).unwrap();
        assert!(other.cross_prefix().unwrap().ends_with('-'));
    }
}
