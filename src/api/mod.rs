//! API adapters: thin layers that convert a protocol to the domain, call the
//! decision service, and convert back. Envoy ext_authz and AuthZEN HTTP plug
//! in beside `grpc`.

pub mod codec;
pub mod convert;
pub mod grpc;
pub mod http;
pub mod json;
pub mod pb;
pub mod tools;

pub use convert::Limits;
