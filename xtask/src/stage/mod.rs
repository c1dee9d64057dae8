//! One module per pipeline stage. Each exposes a function from typed inputs to
//! an artifact record; stages never call back into `main`.

pub mod agent;
pub mod bench;
pub mod container;
pub mod dev;
pub mod disk;
pub mod distribute;
pub mod fuzz;
pub mod image;
pub mod initrd;
pub mod install;
pub mod kernel;
pub mod provenance;
pub mod release;
pub mod rootfs;
pub mod sbom;
pub mod setup;
pub mod test;
