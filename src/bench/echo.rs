//! The baseline: a bare tonic service that returns what it receives, run as
//! its own process so its CPU time can be read the same way as the sidecar's.
//! The same process also stands in for the control plane's decision-log
//! receiver in the decision-log runs (`AckOnly`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb::bench::{EchoMessage, echo_server};
use crate::api::pb::v1::{RecordBatch, ShipAck, decision_log_server};

struct Echo;

#[tonic::async_trait]
impl echo_server::Echo for Echo {
    async fn echo(&self, request: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

/// Acknowledges each decision-log batch once it has unpacked it and counted
/// its lines, storing nothing: a receiver that always keeps up and needs
/// little CPU, so on a 2-core machine it neither lets the sidecar's spool
/// grow nor takes the load generator's core the way a control plane's
/// database would (in production the control plane runs elsewhere). Like
/// the control plane it answers a hello with where the instance's chain
/// stands (kept across streams), acknowledges resends, and takes a batch
/// after a gap (counted as a break).
#[derive(Default)]
struct AckOnly {
    heads: Arc<Mutex<HashMap<String, u64>>>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ShipAck, Status>> + Send>>;

#[tonic::async_trait]
impl decision_log_server::DecisionLog for AckOnly {
    type ShipStream = AckStream;

    async fn ship(
        &self,
        request: Request<Streaming<RecordBatch>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let heads = self.heads.clone();
        tokio::spawn(async move {
            // Batches after the hello do not repeat the instance id.
            let mut instance = None;
            while let Ok(Some(batch)) = inbound.message().await {
                let who = instance.get_or_insert_with(|| batch.instance_id.clone());
                let ack = {
                    let mut heads = heads.lock().unwrap_or_else(|p| p.into_inner());
                    let head = heads.entry(who.clone()).or_default();
                    check_batch(&batch, head)
                };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The acknowledgement of `batch` against the instance's `head` (the last
/// seq taken), which it moves on; or why the batch cannot be taken.
fn check_batch(batch: &RecordBatch, head: &mut u64) -> Result<ShipAck, Status> {
    let ack = |acked_seq, batch_last_seq, chain_breaks| ShipAck {
        instance_id: batch.instance_id.clone(),
        acked_seq,
        chain_breaks,
        accepts_lz4: true,
        acked_hash: Vec::new(),
        batch_last_seq,
    };
    if batch.count == 0 {
        return Ok(ack(*head, 0, 0));
    }
    let last = batch.first_seq.saturating_add(u64::from(batch.count) - 1);
    if batch.first_seq == 0 {
        return Err(Status::invalid_argument("seqs start at 1"));
    }
    let text = crate::controlplane::trail::unpack(batch).map_err(Status::invalid_argument)?;
    let lines = memchr::memchr_iter(b'\n', &text).count();
    if lines != batch.count as usize {
        return Err(Status::invalid_argument(format!(
            "batch at seq {} says {} lines and holds {lines}",
            batch.first_seq, batch.count
        )));
    }
    // A resend is acknowledged again; a batch after a gap is taken, the
    // gap counted as a break, as the control plane does.
    let breaks = u32::from(batch.first_seq > *head + 1);
    *head = (*head).max(last);
    Ok(ack(*head, last, breaks))
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
            .add_service(
                decision_log_server::DecisionLogServer::new(AckOnly::default())
                    .max_decoding_message_size(16 << 20),
            )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first_seq: u64, count: u32, lines: &[u8]) -> RecordBatch {
        use std::io::Write;
        let mut lz4 = lz4_flex::frame::FrameEncoder::new(Vec::new());
        lz4.write_all(lines).expect("lz4");
        RecordBatch {
            instance_id: "i".into(),
            first_seq,
            count,
            lines_deflate: Vec::new(),
            lines_lz4: if count == 0 {
                Vec::new()
            } else {
                lz4.finish().expect("lz4")
            },
        }
    }

    #[test]
    fn the_stand_in_acknowledges_batches_resends_and_gaps_and_refuses_damage() {
        let mut head = 0;
        let hello = check_batch(&batch(0, 0, b""), &mut head).expect("hello");
        assert_eq!((hello.acked_seq, hello.batch_last_seq), (0, 0));
        assert!(hello.accepts_lz4);

        let ack = check_batch(&batch(1, 2, b"{}\n{}\n"), &mut head).expect("ack");
        assert_eq!((ack.acked_seq, ack.batch_last_seq, head), (2, 2, 2));
        // A resend, and a hello on a new stream: where the chain stands.
        let again = check_batch(&batch(2, 1, b"{}\n"), &mut head).expect("resend");
        assert_eq!((again.acked_seq, again.batch_last_seq, head), (2, 2, 2));
        let hello = check_batch(&batch(0, 0, b""), &mut head).expect("hello");
        assert_eq!(hello.acked_seq, 2);

        // After a gap: taken, the gap counted.
        let gap = check_batch(&batch(5, 1, b"{}\n"), &mut head).expect("gap");
        assert_eq!((gap.acked_seq, gap.chain_breaks, head), (5, 1, 5));

        let short = check_batch(&batch(6, 2, b"{}\n"), &mut head).expect_err("count");
        assert!(short.message().contains("holds 1"), "{short:?}");
        let mut garbled = batch(6, 1, b"{}\n");
        garbled.lines_lz4 = b"not lz4".to_vec();
        assert_eq!(
            check_batch(&garbled, &mut head).expect_err("lz4").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(head, 5, "nothing refused moves the head");
    }
}
