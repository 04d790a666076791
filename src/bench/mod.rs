//! `arbiter bench`: drives a real sidecar over gRPC on loopback with C
//! concurrent callers on one HTTP/2 connection, and in the same run a bare
//! tonic echo of the same message size, and prints throughput, latency
//! percentiles, server CPU per call (from `/proc/PID/stat`) and the ratios to
//! the echo baseline.
//!
//! Run it pinned so the figures mean something: `taskset -c 0 arbiter bench`
//! (the servers it starts are pinned to `--server-cpu`, default 1).

mod agent;
mod echo;
pub mod scenario;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

pub use echo::{EchoArgs, run_echo};

use crate::api::json::{request_from_json, request_to_pb};
use crate::api::pb::{bench as echo_pb, v1 as pb};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The 4-policy peer scenario (`examples/peer-bench`).
    Peer,
    /// Peer policies + 1,000 policies over 50 resource types × 20 actions.
    Scope,
    /// Peer policies + 1,000 per-tenant policies sharing one scope.
    Tenant,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "peer,scope,tenant")]
    scenarios: Vec<Scenario>,
    /// Concurrent callers (all on one HTTP/2 connection), each sending its
    /// next call when the last one is answered; one run per value
    /// [default: 1,32, or none when `--rate` is given].
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Offered loads in calls per second (open loop, on the same connection):
    /// each call is sent at its scheduled time whatever earlier calls did,
    /// and its latency counts from that time, so a stall shows in full
    /// instead of slowing the callers down; one run per value.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: Vec<u64>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// CPU list the servers are pinned to with `taskset` (`none` to not pin).
    #[arg(long, default_value = "1")]
    server_cpu: String,
    /// Distinct requests cycled through (same shape and outcome, other ids).
    #[arg(long, default_value_t = 1024)]
    distinct: usize,
    /// Decision cache settings to run: `off`, `on` or both.
    #[arg(long, value_delimiter = ',', default_value = "off,on")]
    cache: Vec<String>,
    /// Compare the policy index with whole-set evaluation (adds runs with the index off).
    #[arg(long)]
    index_off_too: bool,
    /// Decision-log modes to run besides `off` (cache off, shipping to the
    /// `--log-receiver` this bench starts): `buffered`, `durable`.
    #[arg(long, value_delimiter = ',', default_value = "")]
    decision_log: Vec<String>,
    /// What the decision-log runs ship to, started in the background on
    /// the load generator's CPUs.
    #[arg(long, value_enum, default_value = "stand-in")]
    log_receiver: LogReceiver,
    /// Run the control plane at normal priority beside the load generator
    /// (competing with it) instead of in the background: shows whether
    /// shipping keeps up at the saturated rate. Implies
    /// `--log-receiver control-plane`.
    #[arg(long)]
    log_cp_foreground: bool,
    /// `KEY=VALUE` lines added to the `[decision_log]` section of the
    /// decision-log runs, e.g. `fsync=false` or `batch_interval_ms=20`
    /// (to see what a setting costs).
    #[arg(long = "log-setting", value_name = "KEY=VALUE")]
    log_settings: Vec<String>,
    /// Run the sidecar variants this many times, alternating, and end with
    /// their medians and median ratios to `cache off` of the same round
    /// (on a noisy machine one run of each says little).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only time bundle activation (verify, compile, test, swap); no load runs.
    #[arg(long)]
    activation_only: bool,
    /// Instead of the scenario runs: decisions under load for this many
    /// seconds without, then with, a new revision published every second
    /// through a control plane (peer scenario, first concurrency value).
    #[arg(long)]
    swap_seconds: Option<u64>,
    /// Instead of the scenario runs: the agent bundle's `AuthorizeTool`
    /// against `Check` of the same Cedar request, then the time from a
    /// session signal sent to the control plane to the first decision it
    /// changes, under `AuthorizeTool` load, for this many seconds.
    #[arg(long)]
    agent_seconds: Option<u64>,
}

/// How hard a run drives its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// This many callers, each waiting for its answer (closed loop).
    Callers(usize),
    /// Calls sent at this many per second (open loop).
    Rate(u64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Callers(c) => write!(f, "{c}"),
            Load::Rate(r) => write!(f, "{r}/s"),
        }
    }
}

impl BenchArgs {
    /// The closed-loop caller counts.
    fn callers(&self) -> Vec<usize> {
        match (&self.concurrency, self.rate.is_empty()) {
            (Some(c), _) => c.clone(),
            (None, true) => vec![1, 32],
            (None, false) => Vec::new(),
        }
    }

    /// The closed-loop caller counts, for runs that have no open loop.
    fn callers_or_default(&self) -> Vec<usize> {
        self.concurrency.clone().unwrap_or_else(|| vec![1, 32])
    }

    /// Every load to run, closed-loop ones first.
    fn loads(&self) -> Vec<Load> {
        let callers = self.callers().into_iter().map(Load::Callers);
        callers
            .chain(self.rate.iter().map(|&r| Load::Rate(r)))
            .collect()
    }
}

/// Times activating a scenario's bundle as a signed archive: the median of
/// `runs` of each step.
fn time_activation(dir: &Path, runs: usize) -> Result<String, String> {
    use crate::bundle::{ArchiveLimits, Bundle, archive, keys::TrustedKeys};
    use crate::policy::{CompileOptions, Engine};
    let bundle = Bundle::read_dir(dir).map_err(|e| e.to_string())?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let signed = archive::sign(
        &archive::build(&bundle).map_err(|e| e.to_string())?,
        &key,
        &ArchiveLimits::default(),
    )
    .map_err(|e| e.to_string())?;
    let trusted = TrustedKeys::from_keys([key.verifying_key()]);
    let decider = crate::decision::Decider::new(
        crate::decision::CacheSettings::OFF,
        std::sync::Arc::new(crate::telemetry::Metrics::new()),
        None,
    );
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (mut verify, mut compile, mut tests, mut swap, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let verified = archive::verify(&signed, &trusted, &ArchiveLimits::default(), dir)
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let engine = Engine::compile(verified.bundle(), CompileOptions::default())
            .map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        crate::policytest::run(verified.bundle(), &engine)?;
        let t3 = Instant::now();
        decider.activate(engine);
        let t4 = Instant::now();
        verify.push(t1 - t0);
        compile.push(t2 - t1);
        tests.push(t3 - t2);
        swap.push(t4 - t3);
        total.push(t4 - t0);
    }
    Ok(format!(
        "activation ({} bytes signed archive, median of {runs}): {:.1} ms = verify {:.1} + compile {:.1} + tests {:.1} + swap {:.3}",
        signed.len(),
        median(total),
        median(verify),
        median(compile),
        median(tests),
        median(swap)
    ))
}

/// A server process under test.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// user+system CPU time of a process, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at `state`.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux for every mainstream architecture.
    Some(Duration::from_millis((utime + stime) * 10))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn spawn(
    server_cpu: &str,
    args: &[String],
    addr_from: fn(&str) -> Option<String>,
    stderr: bool,
) -> Result<Server, String> {
    spawn_with(server_cpu, false, args, addr_from, stderr)
}

/// The CPUs this bench process may run on (`taskset -c 0 arbiter bench`:
/// `0`), for what runs beside the load generator. Kept off the measured
/// `--server-cpu` only when the bench itself is pinned away from it;
/// `none` (not pinned) if they cannot be read.
fn load_generator_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| cpus_allowed(&status))
        .unwrap_or_else(|| "none".to_owned())
}

fn cpus_allowed(status: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|list| list.trim().to_owned())
        .filter(|list| !list.is_empty())
}

/// `background`: at the idle scheduling class (`chrt --idle 0`, or `nice -n
/// 19` without `chrt`), so it only takes CPU time the load generator leaves
/// idle and gives way to it at once when it wakes.
fn spawn_with(
    server_cpu: &str,
    background: bool,
    args: &[String],
    addr_from: fn(&str) -> Option<String>,
    stderr: bool,
) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let has = |tool: &str, flag: &str| Command::new(tool).arg(flag).output().is_ok();
    let mut prefix: Vec<&str> = Vec::new();
    if background {
        prefix.extend(match has("chrt", "--version") {
            true => ["chrt", "--idle", "0"],
            false => ["nice", "-n", "19"],
        });
    }
    if server_cpu != "none" && has("taskset", "-V") {
        prefix.extend(["taskset", "-c", server_cpu]);
    }
    let mut cmd = match prefix.split_first() {
        Some((tool, rest)) => {
            let mut c = Command::new(tool);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(args).stdin(Stdio::null());
    if stderr {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pipe: Box<dyn std::io::Read + Send> = if stderr {
        Box::new(child.stderr.take().ok_or("no stderr")?)
    } else {
        Box::new(child.stdout.take().ok_or("no stdout")?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if !sent && let Some(addr) = addr_from(&line) {
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| format!("{} did not report its address", args.join(" ")))?;
    Ok(Server { child, addr })
}

/// `GRPC_ADDR|HTTP_ADDR` from the sidecar's listening line.
fn sidecar_addr(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?;
    Some(format!(
        "{}|{}",
        f.get("grpc_addr")?.as_str()?,
        f.get("http_addr")?.as_str()?
    ))
}

fn echo_addr(line: &str) -> Option<String> {
    line.strip_prefix("listening ").map(str::to_owned)
}

/// What one measured run produced.
struct RunStats {
    calls: u64,
    failures: u64,
    elapsed: Duration,
    cpu: Option<Duration>,
    latency: Histogram<u64>,
}

impl RunStats {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
    fn cpu_per_call_us(&self) -> Option<f64> {
        self.cpu
            .map(|c| c.as_secs_f64() * 1e6 / self.calls.max(1) as f64)
    }
    fn pct_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

#[derive(Clone)]
enum Caller {
    Echo(
        echo_pb::echo_client::EchoClient<Channel>,
        std::sync::Arc<Vec<echo_pb::EchoMessage>>,
    ),
    Sidecar(
        pb::authorizer_client::AuthorizerClient<Channel>,
        std::sync::Arc<Vec<pb::CheckRequest>>,
    ),
    Tool(
        pb::tool_access_client::ToolAccessClient<Channel>,
        std::sync::Arc<Vec<pb::AuthorizeToolRequest>>,
    ),
}

impl Caller {
    async fn call(&mut self, i: usize) -> bool {
        match self {
            Caller::Echo(c, msgs) => c.echo(msgs[i % msgs.len()].clone()).await.is_ok(),
            Caller::Sidecar(c, msgs) => c
                .check(msgs[i % msgs.len()].clone())
                .await
                .is_ok_and(|r| r.get_ref().outcome == pb::Outcome::Allow as i32),
            Caller::Tool(c, msgs) => c
                .authorize_tool(msgs[i % msgs.len()].clone())
                .await
                .is_ok_and(|r| r.get_ref().outcome == pb::Outcome::Allow as i32),
        }
    }
}

async fn connect(addr: &str) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// One caller's (or the open loop's) measured calls.
struct Tally {
    calls: u64,
    failures: u64,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            calls: 0,
            failures: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3).ok(),
        }
    }

    fn add(&mut self, ok: bool, took: Duration) {
        self.calls += 1;
        self.failures += u64::from(!ok);
        self.took(took);
    }

    /// An open-loop call's answer: its latency always counts, the call
    /// only if it was answered within the measured window (so req/s and
    /// CPU per call are those achieved, not those offered).
    fn answered(&mut self, ok: bool, took: Duration, in_window: bool) {
        self.calls += u64::from(in_window);
        self.failures += u64::from(!ok);
        self.took(took);
    }

    fn took(&mut self, took: Duration) {
        if let Some(h) = self.latency.as_mut() {
            let _ = h.record(took.as_nanos() as u64);
        }
    }
}

/// Calls an open loop lets wait for answers at once; a call due beyond that
/// is not sent and counts as failed (the target is past its capacity).
const MAX_IN_FLIGHT: usize = 4096;
/// An open-loop call not answered by then counts as failed (so a stuck
/// target ends the run instead of hanging it).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Drives `caller` at `load` for `warmup` then `duration`; only the latter
/// is measured.
async fn drive_load(
    caller: Caller,
    pid: u32,
    load: Load,
    warmup: Duration,
    duration: Duration,
) -> RunStats {
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let tasks = match load {
        Load::Callers(c) => closed_loop(caller, c, measure_from, end),
        Load::Rate(r) => vec![tokio::spawn(open_loop(caller, r, measure_from, end))],
    };
    measure(pid, measure_from, end, tasks).await
}

async fn drive(
    caller: Caller,
    pid: u32,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> RunStats {
    drive_load(caller, pid, Load::Callers(concurrency), warmup, duration).await
}

fn closed_loop(
    caller: Caller,
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let mut caller = caller.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut i = w * 7919;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = caller.call(i).await;
                i += 1;
                if t >= measure_from {
                    tally.add(ok, t.elapsed());
                }
            }
            tally
        }));
    }
    tasks
}

/// Sends a call every `1 / rate` seconds, each on its own task, and times
/// it from when it was due. The dispatcher spins (yielding to the calls'
/// tasks) rather than sleeping, since the runtime's timer is only
/// millisecond-grained: on the load generator's own core.
async fn open_loop(caller: Caller, rate: u64, measure_from: Instant, end: Instant) -> Tally {
    let start = Instant::now();
    // From the start, not by adding an interval: no drift, and no interval
    // rounded to nothing.
    let due_at =
        |i: u64| start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Duration, bool)>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tally = Tally::new();
    let mut i = 0u64;
    let mut due = due_at(0);
    while due < end {
        let now = Instant::now();
        while due <= now && due < end {
            let measured = due >= measure_from;
            if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                // Not sent: a failure, with no latency to show for it.
                tally.failures += u64::from(measured);
            } else {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (mut caller, tx, in_flight) = (caller.clone(), tx.clone(), in_flight.clone());
                let scheduled = due;
                tokio::spawn(async move {
                    let call = tokio::time::timeout(CALL_TIMEOUT, caller.call(i as usize));
                    let ok = call.await.unwrap_or(false);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    if measured {
                        let _ = tx.send((ok, scheduled.elapsed(), Instant::now() < end));
                    }
                });
            }
            i += 1;
            due = due_at(i);
        }
        while let Ok((ok, took, in_window)) = rx.try_recv() {
            tally.answered(ok, took, in_window);
        }
        tokio::task::yield_now().await;
    }
    drop(tx);
    // The calls still out were due within the run: wait for their answers.
    while let Some((ok, took, in_window)) = rx.recv().await {
        tally.answered(ok, took, in_window);
    }
    tally
}

/// Measures the target's CPU over the measured window and sums the tallies.
async fn measure(
    pid: u32,
    measure_from: Instant,
    end: Instant,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
) -> RunStats {
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_start = cpu_time(pid);
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = cpu_time(pid);
    let mut stats = RunStats {
        calls: 0,
        failures: 0,
        // The window calls are counted in (this task may wake late).
        elapsed: end - measure_from,
        cpu: cpu_start.zip(cpu_end).map(|(a, b)| b.saturating_sub(a)),
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
    };
    for t in tasks {
        if let Ok(tally) = t.await {
            stats.calls += tally.calls;
            stats.failures += tally.failures;
            if let Some(h) = tally.latency {
                let _ = stats.latency.add(h);
            }
        }
    }
    stats
}

fn row(label: &str, load: impl std::fmt::Display, s: &RunStats, echo: Option<&RunStats>) -> String {
    let cpu = s
        .cpu_per_call_us()
        .map_or("n/a".into(), |v| format!("{v:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let cpu_ratio = ratio(
        s.cpu_per_call_us(),
        echo.and_then(RunStats::cpu_per_call_us),
    );
    let p50_ratio = ratio(Some(s.pct_us(0.5)), echo.map(|e| e.pct_us(0.5)));
    format!(
        "{label:<28} {:>8} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8} {:>7} {:>7} {:>6}",
        load.to_string(),
        s.rate(),
        s.pct_us(0.5),
        s.pct_us(0.9),
        s.pct_us(0.99),
        s.pct_us(0.999),
        cpu,
        cpu_ratio,
        p50_ratio,
        s.failures
    )
}

const HEADER: &str = "target                           load      req/s   p50 µs   p90 µs   p99 µs p99.9 µs  cpu µs  cpu/echo p50/echo  fails";

struct Prepared {
    name: &'static str,
    dir: PathBuf,
    requests: Vec<pb::CheckRequest>,
}

fn prepare(s: Scenario, tmp: &Path, distinct: usize) -> Result<Prepared, String> {
    let io = |e: std::io::Error| e.to_string();
    let base = scenario::peer_request();
    let (name, dir, tenant) = match s {
        Scenario::Peer => (
            "peer (4 policies)",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/peer-bench"),
            None,
        ),
        Scenario::Scope => {
            let dir = tmp.join("scope");
            scenario::write_scope_bundle(&dir).map_err(io)?;
            ("scope-1000 (+4)", dir, None)
        }
        Scenario::Tenant => {
            let dir = tmp.join("tenant");
            scenario::write_tenant_bundle(&dir).map_err(io)?;
            ("tenant-1000 (+4)", dir, Some("t7"))
        }
    };
    let requests = scenario::request_mix(&base, distinct.max(1), tenant)
        .into_iter()
        .map(|v| request_from_json(v).map(|r| request_to_pb(&r)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        name,
        dir,
        requests,
    })
}

pub fn run(args: BenchArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(args: BenchArgs) -> Result<(), String> {
    let tmp = std::env::temp_dir().join(format!("arbiter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let mut scratch = Scratch(vec![tmp.clone()]);
    let cp_dir = memory_dir(&tmp)?;
    scratch.0.push(cp_dir.clone());
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let threads = if args.server_cpu == "none" {
        "0".to_owned()
    } else {
        cpu_count(&args.server_cpu).to_string()
    };
    println!(
        "arbiter bench: {} s per run after {} s warm-up; servers pinned to CPU {}; one HTTP/2 connection; {} distinct requests",
        args.duration, args.warmup, args.server_cpu, args.distinct
    );

    if let Some(secs) = args.agent_seconds {
        return agent::run(&args, &tmp, Duration::from_secs(secs)).await;
    }
    if let Some(secs) = args.swap_seconds {
        return swap_test(&args, &tmp, Duration::from_secs(secs)).await;
    }
    if args.activation_only {
        for s in &args.scenarios {
            let prepared = prepare(*s, &tmp, 1)?;
            println!("{}: {}", prepared.name, time_activation(&prepared.dir, 7)?);
        }
        return Ok(());
    }
    let echo_server = spawn(
        &args.server_cpu,
        &[
            "bench-echo".into(),
            "--worker-threads".into(),
            threads.clone(),
        ],
        echo_addr,
        false,
    )?;
    let echo_channel = connect(&echo_server.addr).await?;
    let log_modes: Vec<&String> = args
        .decision_log
        .iter()
        .filter(|m| !m.is_empty() && *m != "off")
        .collect();
    let log_sink = if log_modes.is_empty() {
        None
    } else {
        let (receiver, url) = log_receiver(&tmp, &cp_dir, &args)?;
        println!(
            "decision-log runs ship to {} at {url}",
            match args.log_receiver == LogReceiver::StandIn && !args.log_cp_foreground {
                true => "a stand-in receiver (checks and acknowledges batches, stores nothing)",
                false if args.log_cp_foreground => "a control plane in the foreground",
                false => "a control plane",
            }
        );
        Some((receiver, url))
    };

    for s in &args.scenarios {
        let prepared = prepare(*s, &tmp, args.distinct)?;
        println!(
            "\n{}: {}",
            prepared.name,
            time_activation(&prepared.dir, 7)?
        );
        let payloads: Vec<echo_pb::EchoMessage> = prepared
            .requests
            .iter()
            .map(|r| echo_pb::EchoMessage {
                payload: prost::Message::encode_to_vec(r),
            })
            .collect();
        println!(
            "\n== scenario {} ({} bytes per request)",
            prepared.name,
            payloads[0].payload.len()
        );
        println!("{HEADER}");
        let echo_caller = Caller::Echo(
            echo_pb::echo_client::EchoClient::new(echo_channel.clone()),
            payloads.into(),
        );
        let mut echo_runs = Vec::new();
        for load in args.loads() {
            let stats = drive_load(
                echo_caller.clone(),
                echo_server.pid(),
                load,
                warmup,
                duration,
            )
            .await;
            println!("{}", row("echo (bare tonic)", load, &stats, None));
            echo_runs.push(stats);
        }
        let mut variants: Vec<(String, Vec<String>)> = Vec::new();
        for cache in &args.cache {
            let entries = if cache == "on" { "100000" } else { "0" };
            variants.push((
                format!("arbiter cache {cache}"),
                vec!["--cache-entries".into(), entries.into()],
            ));
        }
        for mode in &log_modes {
            let (_, url) = log_sink.as_ref().ok_or("no decision-log receiver")?;
            variants.push((
                format!("arbiter log {mode}"),
                vec![
                    "--cache-entries".into(),
                    "0".into(),
                    "--decision-log-to".into(),
                    url.clone(),
                    "--decision-log-spool".into(),
                    tmp.join(format!(
                        "spool-{mode}-{}",
                        prepared.name.split(' ').next().unwrap_or("x")
                    ))
                    .display()
                    .to_string(),
                    "--decision-log-durability".into(),
                    mode.to_string(),
                ],
            ));
        }
        if args.index_off_too {
            variants.push((
                "arbiter index off".into(),
                vec!["--config".into(), write_index_off(&tmp)?],
            ));
        }
        let mut measured: Vec<Measured> = Vec::new();
        for round in 0..args.rounds.max(1) {
            if args.rounds > 1 {
                println!("-- round {}", round + 1);
            }
            for (label, extra) in &variants {
                let extra: Vec<String> = extra
                    .iter()
                    .map(|a| match a.contains("spool-") {
                        true => format!("{a}-r{round}"),
                        false => a.clone(),
                    })
                    .collect();
                run_variant(
                    &args,
                    &tmp,
                    &threads,
                    &prepared,
                    label,
                    extra,
                    &echo_runs,
                    round,
                    &mut measured,
                )
                .await?;
            }
        }
        if args.rounds > 1 {
            print!("{}", medians(&measured, args.rounds));
        }
    }
    if let Some(kib) = rss_kib(echo_server.pid()) {
        println!(
            "\nRSS of the echo server after the runs: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// Directories the bench made, removed when it ends, on errors too.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where the bench's control plane keeps its database: in memory
/// (`/dev/shm`) where there is one with room for a long run's records (a
/// few GiB: one control plane stores every round). The control plane is not
/// what is measured, and its disk writes would be: a disk's completion
/// interrupts may land on the sidecar's pinned core (they do on the VM the
/// README's figures come from), billing the store's writes to the sidecar.
fn memory_dir(tmp: &Path) -> Result<PathBuf, String> {
    const ROOM: u64 = 4 << 30;
    let shm = Path::new("/dev/shm");
    #[cfg(target_os = "linux")]
    let free = |p: &Path| {
        rustix::fs::statvfs(p)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0)
    };
    #[cfg(not(target_os = "linux"))]
    let free = |_: &Path| 0u64;
    let dir = match shm.is_dir() && free(shm) >= ROOM {
        true => shm.join(format!("arbiter-bench-{}", std::process::id())),
        false => {
            println!(
                "(the control plane's database is on disk: /dev/shm is missing or has under 4 GiB free)"
            );
            tmp.join("control-plane")
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// One sidecar run's figures, for the medians over rounds.
struct Measured {
    round: usize,
    label: String,
    load: Load,
    rate: f64,
    p99_us: f64,
    cpu_us: Option<f64>,
}

/// Starts one sidecar variant and drives it at every load.
#[allow(clippy::too_many_arguments)]
async fn run_variant(
    args: &BenchArgs,
    tmp: &Path,
    threads: &str,
    prepared: &Prepared,
    label: &str,
    extra: Vec<String>,
    echo_runs: &[RunStats],
    round: usize,
    measured: &mut Vec<Measured>,
) -> Result<(), String> {
    let (warmup, duration) = (
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
    );
    let log_settings: &[String] = if label.starts_with("arbiter log") {
        &args.log_settings
    } else {
        &[]
    };
    let config = write_threads_config(tmp, threads, log_settings)?;
    let mut serve_args = serve_command(&["--bundle".into(), prepared.dir.display().to_string()]);
    if !extra.iter().any(|a| a == "--config") {
        serve_args.extend(["--config".into(), config]);
    }
    serve_args.extend(extra);
    let sidecar = spawn(&args.server_cpu, &serve_args, sidecar_addr, true)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(sidecar.pid());
    let (grpc_addr, http_addr) = sidecar.addr.split_once('|').unwrap_or((&sidecar.addr, ""));
    let channel = connect(grpc_addr).await?;
    let caller = Caller::Sidecar(
        pb::authorizer_client::AuthorizerClient::new(channel),
        prepared.requests.clone().into(),
    );
    for (i, load) in args.loads().into_iter().enumerate() {
        let stats = drive_load(caller.clone(), sidecar.pid(), load, warmup, duration).await;
        println!("{}", row(label, load, &stats, echo_runs.get(i)));
        if label.starts_with("arbiter log") {
            print!("{}", shipping_report(http_addr).await);
        }
        measured.push(Measured {
            round,
            label: label.to_owned(),
            load,
            rate: stats.rate(),
            p99_us: stats.pct_us(0.99),
            cpu_us: stats.cpu_per_call_us(),
        });
    }
    if let (Some(kib), 0) = (idle_rss, round) {
        println!(
            "  idle RSS of the sidecar ({label}): {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// Medians over rounds of each variant's figures, and of its ratios to
/// `arbiter cache off` at the same concurrency in the same round.
fn medians(measured: &[Measured], rounds: usize) -> String {
    fn median(mut v: Vec<f64>) -> Option<f64> {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        let n = v.len();
        match n % 2 {
            _ if n == 0 => None,
            1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }
    let fmt = |v: Option<f64>, suffix: &str| v.map_or("-".into(), |v| format!("{v:.2}{suffix}"));
    let mut out = format!(
        "\nmedians of {rounds} rounds (ratios: to `arbiter cache off`, same round and load)\n{:<28} {:>8} {:>10} {:>9} {:>8} {:>11} {:>11}\n",
        "target", "load", "req/s", "p99 µs", "cpu µs", "cpu vs off", "p99 vs off"
    );
    let mut seen: Vec<(&str, Load)> = Vec::new();
    for m in measured {
        if seen.contains(&(m.label.as_str(), m.load)) {
            continue;
        }
        seen.push((&m.label, m.load));
        let runs: Vec<&Measured> = measured
            .iter()
            .filter(|x| x.label == m.label && x.load == m.load)
            .collect();
        let off = |r: &Measured| {
            measured
                .iter()
                .find(|x| x.label == "arbiter cache off" && x.load == r.load && x.round == r.round)
        };
        let cpu_ratios: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(r.cpu_us? / off(r)?.cpu_us?))
            .collect();
        let p99_ratios: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(r.p99_us / off(r)?.p99_us))
            .collect();
        out.push_str(&format!(
            "{:<28} {:>8} {:>10.0} {:>9.1} {:>8} {:>11} {:>11}\n",
            m.label,
            m.load.to_string(),
            median(runs.iter().map(|r| r.rate).collect()).unwrap_or(0.0),
            median(runs.iter().map(|r| r.p99_us).collect()).unwrap_or(0.0),
            fmt(median(runs.iter().filter_map(|r| r.cpu_us).collect()), ""),
            fmt(median(cpu_ratios.clone()), "x"),
            fmt(median(p99_ratios.clone()), "x"),
        ));
        if m.label == "arbiter log buffered" {
            out.push_str(&buffered_verdict(&cpu_ratios, &p99_ratios));
        }
    }
    out
}

/// The targets for `buffered`: at most 10 % more CPU per call and
/// a p99 within 1.2× of off.
const BUFFERED_TARGETS: (f64, f64) = (1.10, 1.20);

/// Whether a set of rounds shows the `buffered` targets met: each ratio's
/// median with its interval, met only if the whole interval is within the
/// target. One median says little on a noisy machine; this says how much.
fn buffered_verdict(cpu: &[f64], p99: &[f64]) -> String {
    let one = |name: &str, ratios: &[f64], target: f64| match median_interval(ratios) {
        None => format!("    {name}: needs {MIN_ROUNDS} rounds or more for an interval\n"),
        Some((lo, hi, coverage)) => format!(
            "    {name}: median's {:.1} % interval {lo:.2}x..{hi:.2}x, target <= {target:.2}x: {}\n",
            coverage * 100.0,
            match (hi <= target, lo > target) {
                (true, _) => "met",
                (_, true) => "missed",
                _ => "not shown either way",
            }
        ),
    };
    format!(
        "  targets for buffered (distribution-free, from the rounds' order statistics):\n{}{}",
        one("cpu vs off", cpu, BUFFERED_TARGETS.0),
        one("p99 vs off", p99, BUFFERED_TARGETS.1)
    )
}

/// Rounds needed for an interval worth printing (5: 93.8 %).
const MIN_ROUNDS: usize = 5;

/// A distribution-free confidence interval for the median of `values`:
/// `(low, high, coverage)`, the k-th smallest and k-th largest values for
/// the largest k that keeps coverage at 95 % or more (with fewer than 6
/// values, the extremes and what they cover). `None` below [`MIN_ROUNDS`].
fn median_interval(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < MIN_ROUNDS {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // below[j] = P(B <= j) for B ~ Binomial(n, 1/2).
    let mut below = Vec::with_capacity(n / 2 + 1);
    let (mut choose, mut sum) = (1.0f64, 0.0f64);
    for i in 0..=n / 2 {
        if i > 0 {
            choose = choose * (n - i + 1) as f64 / i as f64;
        }
        sum += choose / 2f64.powi(n as i32);
        below.push(sum);
    }
    // The median lies below the k-th smallest with probability P(B <= k-1).
    let k = (1..=n / 2)
        .take_while(|k| below[k - 1] <= 0.025)
        .last()
        .unwrap_or(1);
    Some((v[k - 1], v[n - k], 1.0 - 2.0 * below[k - 1]))
}

fn cpu_count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .unwrap_or(0)
                    .saturating_sub(a.parse().unwrap_or(0))
                    + 1
            }
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

/// `arbiter serve` on free loopback ports, logging JSON at warn (plus the
/// listening line the bench reads), with `extra` arguments.
fn serve_command(extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "warn,arbiter::server=info",
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    args
}

/// A config file with the servers' worker threads and, if any, decision-log settings.
fn write_threads_config(
    tmp: &Path,
    threads: &str,
    log_settings: &[String],
) -> Result<String, String> {
    let mut text = format!("[server]\nworker_threads = {threads}\n");
    if !log_settings.is_empty() {
        text.push_str("[decision_log]\n");
        for kv in log_settings {
            text.push_str(kv);
            text.push('\n');
        }
    }
    let path = tmp.join(format!("threads-{threads}-{}.toml", log_settings.len()));
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path.display().to_string())
}

fn write_index_off(tmp: &Path) -> Result<String, String> {
    let path = tmp.join("index-off.toml");
    std::fs::write(
        &path,
        "[server]\nworker_threads = 1\n[policy]\nindex = false\n",
    )
    .map_err(|e| e.to_string())?;
    Ok(path.display().to_string())
}

fn write_public_key(key: &ed25519_dalek::SigningKey, path: &Path) -> Result<(), String> {
    use ed25519_dalek::pkcs8::EncodePublicKey;
    let pem = key
        .verifying_key()
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| e.to_string())?;
    std::fs::write(path, pem).map_err(|e| e.to_string())
}

/// Starts what the decision-log runs ship to. Returns it and its URL.
fn log_receiver(tmp: &Path, db_dir: &Path, args: &BenchArgs) -> Result<(Server, String), String> {
    if args.log_receiver == LogReceiver::ControlPlane || args.log_cp_foreground {
        return decision_log_sink(tmp, db_dir, args.log_cp_foreground);
    }
    // In the background on the load generator's CPUs, as the control
    // plane would be.
    let receiver = spawn_with(
        &load_generator_cpus(),
        true,
        &["bench-echo".into(), "--worker-threads".into(), "1".into()],
        echo_addr,
        false,
    )?;
    let url = format!("http://{}", receiver.addr);
    Ok((receiver, url))
}

/// Starts a control plane for the decision log (and agent) runs. Returns it
/// and its URL.
fn decision_log_sink(
    tmp: &Path,
    db_dir: &Path,
    foreground: bool,
) -> Result<(Server, String), String> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let public = tmp.join("log.pub.pem");
    write_public_key(&key, &public)?;
    // On the load generator's CPUs in the idle scheduling class, so it
    // takes neither the measured sidecar's CPU nor the load generator's (in
    // production it runs elsewhere).
    let cp = spawn_with(
        &load_generator_cpus(),
        !foreground,
        &[
            "control-plane".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            db_dir.join("log-cp.db").display().to_string(),
            "--trusted-key".into(),
            public.display().to_string(),
            "--token".into(),
            BENCH_TOKEN.into(),
            "--log-format".into(),
            "json".into(),
        ],
        control_plane_addr,
        true,
    )?;
    let url = format!("http://{}", cp.addr);
    Ok((cp, url))
}

/// What the decision-log runs ship to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogReceiver {
    /// A receiver that unpacks each batch, checks its seqs and line count
    /// and acknowledges it, storing nothing: it always keeps up and takes
    /// little of the load generator's core, as a control plane on another
    /// machine would. Measures the sidecar's own cost.
    StandIn,
    /// A real control plane (SQLite store, chain verification): shows how
    /// shipping and the store keep up when they share this machine.
    ControlPlane,
}

/// The operator token of the control planes the bench starts.
const BENCH_TOKEN: &str = "bench-token-0123456789";

/// A metric's value from a Prometheus text page.
fn metric_value(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// After a decision-log run: how far shipping lags at the end of the load and
/// two seconds later (spooled vs acknowledged records, spool bytes), and
/// how long the spool's writes took.
async fn shipping_report(http_addr: &str) -> String {
    let Ok(client) = crate::controlplane::AdminClient::new(
        &format!("http://{http_addr}"),
        "",
        Duration::from_secs(5),
        None,
    ) else {
        return "  (no metrics)".into();
    };
    let mut out = String::new();
    let mut writes = String::new();
    for when in ["end of load", "+2 s"] {
        if when == "+2 s" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let page = client.get("/metrics").await.unwrap_or_default();
        if when == "end of load" {
            writes = spool_writes(&page);
        }
        let m = |n: &str| metric_value(&page, n).unwrap_or(-1.0);
        let spooled = m("arbiter_decision_log_spooled_records_total");
        let acked = m("arbiter_decision_log_acknowledged_records_total");
        out.push_str(&format!(
            "  decision log at {when}: {spooled:.0} spooled, {acked:.0} acknowledged (lag {:.0}), spool {:.0} KiB, dropped {:.0}, refused {:.0}\n",
            spooled - acked,
            m("arbiter_decision_log_spool_bytes") / 1024.0,
            m("arbiter_decision_log_dropped_records_total"),
            m("arbiter_decision_log_refused_decisions_total"),
        ));
    }
    out.push_str(&writes);
    out
}

/// The spool's writes so far and their mean time, from a metrics page
/// (empty if it has none).
fn spool_writes(page: &str) -> String {
    let m = |n: &str| metric_value(page, n);
    match (
        m("arbiter_decision_log_spool_write_seconds_count"),
        m("arbiter_decision_log_spool_write_seconds_sum"),
    ) {
        (Some(writes), Some(secs)) if writes > 0.0 => format!(
            "  spool writes: {writes:.0}, mean {:.0} µs each (fsync included)\n",
            secs / writes * 1e6
        ),
        _ => String::new(),
    }
}

fn control_plane_addr(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?;
    (f.get("message")?.as_str()? == "control plane listening")
        .then(|| f.get("addr")?.as_str().map(str::to_owned))?
}

/// Signed archives of the peer bundle with revisions "1".."n".
fn numbered_archives(n: usize, key: &ed25519_dalek::SigningKey) -> Result<Vec<Vec<u8>>, String> {
    use crate::bundle::{ArchiveLimits, Bundle, archive};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/peer-bench");
    let base = Bundle::read_dir(&dir).map_err(|e| e.to_string())?;
    (1..=n)
        .map(|rev| {
            let mut b = base.clone();
            b.manifest.revision = rev.to_string();
            let manifest = serde_json::to_vec(&b.manifest).map_err(|e| e.to_string())?;
            b.files.insert("manifest.json".into(), manifest);
            let unsigned = archive::build(&b).map_err(|e| e.to_string())?;
            archive::sign(&unsigned, key, &ArchiveLimits::default()).map_err(|e| e.to_string())
        })
        .collect()
}

/// Per caller: (calls, failures, revision went backwards, latencies, revisions seen).
type SwapRun = (
    u64,
    u64,
    u64,
    Histogram<u64>,
    std::collections::BTreeSet<u64>,
);

async fn drive_recording(
    channel: Channel,
    requests: std::sync::Arc<Vec<pb::CheckRequest>>,
    c: usize,
    duration: Duration,
) -> SwapRun {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..c {
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).ok();
            let (mut calls, mut failures, mut backwards, mut last) = (0u64, 0u64, 0u64, 0u64);
            let mut seen = std::collections::BTreeSet::new();
            let mut i = w * 7919;
            while Instant::now() < end {
                let t = Instant::now();
                let r = client.check(requests[i % requests.len()].clone()).await;
                i += 1;
                calls += 1;
                if let Some(h) = hist.as_mut() {
                    let _ = h.record(t.elapsed().as_nanos() as u64);
                }
                match r {
                    Ok(r) if r.get_ref().decision => {
                        let rev: u64 = r.get_ref().revision.parse().unwrap_or(0);
                        backwards += u64::from(rev < last);
                        last = last.max(rev);
                        seen.insert(rev);
                    }
                    _ => failures += 1,
                }
            }
            (calls, failures, backwards, hist, seen)
        }));
    }
    let mut total: SwapRun = (
        0,
        0,
        0,
        Histogram::new(3).unwrap_or_else(|_| unreachable!()),
        Default::default(),
    );
    for t in tasks {
        if let Ok((calls, failures, backwards, hist, seen)) = t.await {
            total.0 += calls;
            total.1 += failures;
            total.2 += backwards;
            if let Some(h) = hist {
                let _ = total.3.add(h);
            }
            total.4.extend(seen);
        }
    }
    total
}

async fn swap_test(args: &BenchArgs, tmp: &Path, duration: Duration) -> Result<(), String> {
    use crate::controlplane::AdminClient;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let public = tmp.join("swap.pub.pem");
    write_public_key(&key, &public)?;
    let swaps = usize::try_from(duration.as_secs()).unwrap_or(30) + 2;
    let archives = numbered_archives(swaps, &key)?;
    let token = BENCH_TOKEN;
    let cp = spawn(
        "none",
        &[
            "control-plane".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            tmp.join("cp.db").display().to_string(),
            "--trusted-key".into(),
            public.display().to_string(),
            "--token".into(),
            token.into(),
            "--log-format".into(),
            "json".into(),
        ],
        control_plane_addr,
        true,
    )?;
    let cp_url = format!("http://{}", cp.addr);
    let admin = AdminClient::new(&cp_url, token, Duration::from_secs(30), None)
        .map_err(|e| e.to_string())?;
    admin
        .push("peer-bench", archives[0].clone().into())
        .await
        .map_err(|e| e.to_string())?;
    let threads = cpu_count(&args.server_cpu).to_string();
    let sidecar = spawn(
        &args.server_cpu,
        &serve_command(&[
            "--control-plane".into(),
            cp_url.clone(),
            "--bundle-name".into(),
            "peer-bench".into(),
            "--trusted-key".into(),
            public.display().to_string(),
            "--bundle-cache".into(),
            tmp.join("cache").display().to_string(),
            "--config".into(),
            write_threads_config(tmp, &threads, &[])?,
        ]),
        sidecar_addr,
        true,
    )?;
    let grpc_addr = sidecar.addr.split('|').next().unwrap_or_default();
    let channel = connect(grpc_addr).await?;
    let requests: Vec<pb::CheckRequest> =
        scenario::request_mix(&scenario::peer_request(), args.distinct.max(1), None)
            .into_iter()
            .map(|v| request_from_json(v).map(|r| request_to_pb(&r)))
            .collect::<Result<_, _>>()?;
    let requests = std::sync::Arc::new(requests);
    let c = args.callers_or_default().first().copied().unwrap_or(32);
    // Wait until the first revision answers, then warm up.
    let ready = Instant::now() + Duration::from_secs(30);
    while drive_recording(
        channel.clone(),
        requests.clone(),
        1,
        Duration::from_millis(100),
    )
    .await
    .1 > 0
    {
        if Instant::now() > ready {
            return Err("the sidecar never activated the first revision".into());
        }
    }
    drive_recording(
        channel.clone(),
        requests.clone(),
        c,
        Duration::from_secs_f64(args.warmup),
    )
    .await;
    let still = drive_recording(channel.clone(), requests.clone(), c, duration).await;
    let publisher = tokio::spawn(async move {
        let mut published = 1;
        for archive in archives.into_iter().skip(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if admin.push("peer-bench", archive.into()).await.is_ok() {
                published += 1;
            }
        }
        published
    });
    let swapping = drive_recording(channel, requests, c, duration).await;
    publisher.abort();
    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "swap test: peer scenario, C={c}, {} s without swaps, then {} s with a new revision published every second",
        duration.as_secs(),
        duration.as_secs()
    );
    for (label, r) in [("no swaps", &still), ("swapping", &swapping)] {
        println!(
            "  {label:<9} calls {:>8}  failures {:>3}  p50 {:>7.1} µs  p99 {:>7.1} µs  revisions seen {:>3}  went backwards {}",
            r.0,
            r.1,
            r.3.value_at_quantile(0.5) as f64 / 1000.0,
            p99(&r.3),
            r.4.len(),
            r.2
        );
    }
    println!(
        "  p99 with swaps / without: {:.2}x",
        p99(&swapping.3) / p99(&still.3).max(f64::MIN_POSITIVE)
    );
    drop(sidecar);
    drop(cp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{buffered_verdict, cpus_allowed, median_interval, spool_writes};

    #[test]
    fn spool_writes_are_reported_from_the_histogram() {
        let page = "arbiter_decision_log_spool_write_seconds_sum 0.5\narbiter_decision_log_spool_write_seconds_count 2000\n";
        assert_eq!(
            spool_writes(page),
            "  spool writes: 2000, mean 250 µs each (fsync included)\n"
        );
        // No writes yet, or no trail: nothing to say.
        assert_eq!(
            spool_writes("arbiter_decision_log_spool_write_seconds_count 0\n"),
            ""
        );
        assert_eq!(spool_writes(""), "");
    }

    #[test]
    fn the_medians_interval_comes_from_order_statistics() {
        // Five values: the extremes, covering 1 - 2/32.
        let (lo, hi, c) = median_interval(&[1.3, 1.0, 1.2, 1.1, 1.4]).expect("five");
        assert_eq!((lo, hi), (1.0, 1.4));
        assert!((c - 0.9375).abs() < 1e-9, "{c}");
        // Ten: the 2nd smallest and 2nd largest (P(B <= 1) = 11/1024).
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let (lo, hi, c) = median_interval(&ten).expect("ten");
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((c - (1.0 - 22.0 / 1024.0)).abs() < 1e-9, "{c}");
        // Fifteen: the 4th (P(B <= 3) = 576/32768 = 0.0176; P(B <= 4) = 0.059).
        let fifteen: Vec<f64> = (1..=15).map(f64::from).collect();
        assert_eq!(
            median_interval(&fifteen).map(|i| (i.0, i.1)),
            Some((4.0, 12.0))
        );
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, f64::NAN]), None);
    }

    #[test]
    fn the_buffered_targets_are_met_only_by_a_whole_interval() {
        let v = buffered_verdict(&[1.02, 1.05, 1.04, 1.08, 1.09], &[1.1, 1.3, 1.0, 1.15, 0.9]);
        let lines: Vec<&str> = v.lines().collect();
        assert!(
            lines[1].contains("1.02x..1.09x") && lines[1].ends_with(": met"),
            "{v}"
        );
        assert!(lines[2].ends_with("not shown either way"), "{v}");
        let v = buffered_verdict(&[1.2, 1.3, 1.25, 1.4, 1.21], &[1.0; 3]);
        assert!(v.lines().nth(1).expect("cpu").ends_with(": missed"), "{v}");
        assert!(
            v.lines().nth(2).expect("p99").contains("needs 5 rounds"),
            "{v}"
        );
    }

    #[test]
    fn the_load_generators_cpus_are_read_from_its_status() {
        let status = "Name:\tarbiter\nCpus_allowed:\t1\nCpus_allowed_list:\t0\nMems_allowed:\t1\n";
        assert_eq!(cpus_allowed(status).as_deref(), Some("0"));
        assert_eq!(
            cpus_allowed("Cpus_allowed_list:\t0-1,3\n").as_deref(),
            Some("0-1,3")
        );
        assert_eq!(cpus_allowed("Name:\tarbiter\n"), None);
        assert_eq!(cpus_allowed("Cpus_allowed_list:\t\n"), None);
    }
}
