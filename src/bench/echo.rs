//! The baseline: a bare tonic service that returns what it receives, run as
//! its own process so its CPU time can be read the same way as the sidecar's.

use std::net::SocketAddr;
use std::process::ExitCode;

use tonic::{Request, Response, Status};

use crate::api::pb::bench::{EchoMessage, echo_server};

struct Echo;

#[tonic::async_trait]
impl echo_server::Echo for Echo {
    async fn echo(&self, request: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Listen address; the bound address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Tokio worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

pub fn run_echo(args: EchoArgs) -> ExitCode {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    let Ok(rt) = rt.build() else {
        return ExitCode::FAILURE;
    };
    let result: Result<(), String> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening {addr}");
        tonic::transport::Server::builder()
            .add_service(echo_server::EchoServer::new(Echo))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                crate::server::shutdown_signal(),
            )
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
