//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no `protoc`
//! install is needed, and writes the descriptor sets gRPC reflection serves.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // One package per compile: protos of one package share a generated file.
    for (protos, descriptor) in [
        (
            &[
                "proto/arbiter/v1/authorizer.proto",
                "proto/arbiter/v1/decision_log.proto",
                "proto/arbiter/v1/tool_access.proto",
                "proto/arbiter/v1/sessions.proto",
            ][..],
            "authorizer_descriptor.bin",
        ),
        (
            &["proto/arbiter/bench/v1/echo.proto"][..],
            "echo_descriptor.bin",
        ),
    ] {
        for proto in protos {
            println!("cargo:rerun-if-changed={proto}");
        }
        let fds = protox::compile(protos, ["proto"])?;
        fs::write(out.join(descriptor), prost::Message::encode_to_vec(&fds))?;
        tonic_prost_build::configure()
            .codec_path("crate::api::codec::StrictProstCodec")
            .compile_fds(fds)?;
    }
    Ok(())
}
