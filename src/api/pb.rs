//! Generated protobuf and gRPC code, kept here: the rest of the crate sees
//! domain types, converted at the edge in `api::convert`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("arbiter.v1");
}

pub mod bench {
    tonic::include_proto!("arbiter.bench.v1");
}

/// Descriptor of `arbiter.v1`, served by gRPC reflection.
pub const AUTHORIZER_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/authorizer_descriptor.bin"));
/// Descriptor of the benchmark echo service.
pub const ECHO_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));
