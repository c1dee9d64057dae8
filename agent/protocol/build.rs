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

/// With the crate's `serde` feature, every message serialises the way Kata's
/// `with-serde` protocols crate does (its agent policy reads that JSON):
/// Rust field names, enums as numbers, an unset message as `null`.
struct SerdeDerive;

impl ttrpc_codegen::ProtobufCustomizeCallback for SerdeDerive {
    fn message(
        &self,
        _: &protobuf::reflect::MessageDescriptor,
    ) -> ttrpc_codegen::ProtobufCustomize {
        derive()
    }

    fn oneof(&self, _: &protobuf::reflect::OneofDescriptor) -> ttrpc_codegen::ProtobufCustomize {
        derive()
    }

    fn field(
        &self,
        field: &protobuf::reflect::FieldDescriptor,
    ) -> ttrpc_codegen::ProtobufCustomize {
        use protobuf::descriptor::field_descriptor_proto::Type;
        let with = match field.proto().type_() {
            Type::TYPE_ENUM if field.is_singular() => "crate::serde_enum",
            Type::TYPE_MESSAGE if field.is_singular() => "crate::serde_message_field",
            _ => return ttrpc_codegen::ProtobufCustomize::default(),
        };
        ttrpc_codegen::ProtobufCustomize::default().before(&format!(
            "#[cfg_attr(feature = \"serde\", serde(serialize_with = \"{with}\"))]"
        ))
    }

    fn special_field(
        &self,
        _: &protobuf::reflect::MessageDescriptor,
        _: &str,
    ) -> ttrpc_codegen::ProtobufCustomize {
        ttrpc_codegen::ProtobufCustomize::default()
            .before("#[cfg_attr(feature = \"serde\", serde(skip))]")
    }
}

fn derive() -> ttrpc_codegen::ProtobufCustomize {
    ttrpc_codegen::ProtobufCustomize::default()
        .before("#[cfg_attr(feature = \"serde\", derive(::serde::Serialize))]")
}

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
        .rust_protobuf_customize_callback(SerdeDerive)
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("protobuf/ttrpc code generation failed; see the .proto error above");
    let body: String = MODULES.iter().map(|m| format!("pub mod {m};\n")).collect();
    std::fs::write(out.join("protocols.rs"), body).expect("writing protocols.rs into OUT_DIR");
}
