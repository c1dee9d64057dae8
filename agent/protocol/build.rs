//! Generates the ttrpc protocol code from protos/ at build time with the
//! pure-Rust protobuf parser, so no system `protoc` is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "health.proto",
    "agent.proto",
    "types.proto",
    "oci.proto",
    "csi.proto",
    "kiln.proto",
];
/// Generated modules; they refer to each other as `super::<name>`, so they
/// must be siblings under exactly these names.
const MODULES: &[&str] = &[
    "agent",
    "agent_ttrpc",
    "csi",
    "health",
    "health_ttrpc",
    "kiln",
    "kiln_ttrpc",
    "oci",
    "types",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let inputs: Vec<String> = PROTOS.iter().map(|p| format!("protos/{p}")).collect();
    for p in &inputs {
        println!("cargo:rerun-if-changed={p}");
    }
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(&inputs)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("protobuf/ttrpc code generation failed; see the .proto error above");
    let body: String = MODULES.iter().map(|m| format!("pub mod {m};\n")).collect();
    std::fs::write(out.join("protocols.rs"), body).expect("writing protocols.rs into OUT_DIR");
}
