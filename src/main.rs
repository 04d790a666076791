//! The `arbiter` command: parses the command line and hands each subcommand
//! to the part that does it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use arbiter::config::Config;
use arbiter::telemetry::{LogFormat, init_logging};

/// Exit codes, after sysexits.h.
const EXIT_USAGE: u8 = 64;
const EXIT_DATAERR: u8 = 65;

#[derive(Parser)]
#[command(name = "arbiter", version, about = "A policy decision point sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve decisions over gRPC (and metrics/health over HTTP) from a bundle.
    Serve(ServeArgs),
    /// Evaluate one JSON request, offline against a bundle or on a running sidecar.
    Check(CheckArgs),
    /// Build, sign and inspect policy bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Run the reference control plane: stores bundles, serves them to sidecars.
    ControlPlane(ControlPlaneArgs),
    /// Run the policy tests a bundle carries (`tests/*.json`).
    Test(TestArgs),
    /// Ask the decision trail: show one decision, query, verify the chain.
    #[command(subcommand)]
    Log(LogCommand),
    /// Send a session signal (CAEP-style) to the control plane.
    #[command(subcommand)]
    Signal(SignalCommand),
    /// List, approve or deny approval requests on the control plane.
    #[command(subcommand)]
    Approval(ApprovalCommand),
    /// Load-test a sidecar against a bare gRPC echo baseline.
    Bench(arbiter::bench::BenchArgs),
    /// The echo server `bench` measures against (started by `bench`).
    #[command(hide = true)]
    BenchEcho(arbiter::bench::EchoArgs),
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Validate, test and pack a bundle directory into an archive.
    Build {
        /// The bundle directory.
        dir: PathBuf,
        /// Where to write the archive (`.tar.gz`).
        #[arg(short, long)]
        out: PathBuf,
        /// Sign with this private key (PEM) as well.
        #[arg(long)]
        sign_key: Option<PathBuf>,
    },
    /// Make an Ed25519 key pair: PREFIX.key.pem (private) and PREFIX.pub.pem.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature to an archive (in place unless `-o`).
    Sign {
        file: PathBuf,
        /// Private key (PEM).
        #[arg(long)]
        key: PathBuf,
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Publish an archive to a control plane (which makes it active).
    Push {
        file: PathBuf,
        /// Control plane URL, e.g. `http://127.0.0.1:8181`.
        #[arg(long)]
        to: String,
        /// Bearer token of the control plane.
        #[arg(long, env = "ARBITER_CONTROL_PLANE_TOKEN", hide_env_values = true)]
        token: String,
        /// Certificate authority (PEM) of an https control plane.
        #[arg(long, env = "ARBITER_CONTROL_PLANE_CA")]
        ca: Option<PathBuf>,
    },
    /// Make an earlier revision active again.
    Rollback {
        name: String,
        #[arg(long = "to-revision")]
        revision: String,
        #[arg(long = "control-plane")]
        control_plane: String,
        #[arg(long, env = "ARBITER_CONTROL_PLANE_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, env = "ARBITER_CONTROL_PLANE_CA")]
        ca: Option<PathBuf>,
    },
    /// List a bundle's revisions on a control plane (`*` = active).
    Revisions {
        name: String,
        #[arg(long = "control-plane")]
        control_plane: String,
        /// The operator token; needed where the control plane has a sidecar token.
        #[arg(
            long,
            env = "ARBITER_CONTROL_PLANE_TOKEN",
            hide_env_values = true,
            default_value = ""
        )]
        token: String,
        #[arg(long, env = "ARBITER_CONTROL_PLANE_CA")]
        ca: Option<PathBuf>,
    },
    /// Show an archive's revision, files, digests, signers and policy count.
    Inspect {
        file: PathBuf,
        /// Also verify against these public keys.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
    },
}

/// Where the trail is read: the control plane and its operator token.
#[derive(Args)]
struct TrailSource {
    /// Control plane URL, e.g. `http://127.0.0.1:8181`.
    #[arg(long = "control-plane", env = "ARBITER_CONTROL_PLANE")]
    control_plane: String,
    #[arg(long, env = "ARBITER_CONTROL_PLANE_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long, env = "ARBITER_CONTROL_PLANE_CA")]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SignalCommand {
    /// Send one signal about a session or a subject; sidecars apply it at once.
    Send {
        /// session-revoked | revocation-lifted (a subject's) | risk-level-changed |
        /// assurance-level-changed | device-compliance-changed
        #[arg(value_name = "TYPE")]
        kind: String,
        /// The new level: low|medium|high, e.g. aal2, compliant|not-compliant.
        value: Option<String>,
        /// The session the signal is about.
        #[arg(long, conflicts_with = "subject", required_unless_present = "subject")]
        session: Option<String>,
        /// Or the subject, as `Type::"id"` (e.g. `User::"alice"`): all its sessions.
        #[arg(long)]
        subject: Option<String>,
        /// Why, kept in the trail record.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        source: TrailSource,
    },
}

#[derive(Subcommand)]
enum ApprovalCommand {
    /// Approval requests, newest first.
    List {
        /// Only those in this state: pending, granted, denied, used, expired.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: TrailSource,
    },
    /// Grant a pending request: the call it is bound to may then go ahead once.
    Approve {
        id: String,
        /// The approver's name, kept with the grant and in the trail.
        #[arg(long, env = "USER")]
        by: String,
        #[command(flatten)]
        source: TrailSource,
    },
    /// Refuse a pending request.
    Deny {
        id: String,
        #[arg(long, env = "USER")]
        by: String,
        #[command(flatten)]
        source: TrailSource,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Print one decision: masked request, outcome, deciding policies with their text.
    Show {
        decision_id: String,
        #[command(flatten)]
        source: TrailSource,
        /// Print the JSON the control plane holds.
        #[arg(long)]
        json: bool,
    },
    /// List decisions matching every filter given (oldest first).
    Query {
        #[command(flatten)]
        source: TrailSource,
        /// From this time (UTC RFC 3339, e.g. 2026-11-24T10:00:00Z), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Until this time, exclusive.
        #[arg(long)]
        until: Option<String>,
        /// Subject id (and optionally --subject-type).
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        subject_type: Option<String>,
        /// Resource id (and optionally --resource-type).
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        resource_type: Option<String>,
        /// ALLOW, DENY, STEP_UP or APPROVAL_REQUIRED.
        #[arg(long)]
        outcome: Option<String>,
        /// Decisions this policy id took part in.
        #[arg(long)]
        policy: Option<String>,
        /// One sidecar instance.
        #[arg(long)]
        instance: Option<String>,
        /// Only records kept apart as forked (a sidecar's spool that lost
        /// records it had shipped numbered new ones with their seqs).
        #[arg(long)]
        forked: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// Check hash chains: on the control plane, in an NDJSON export, or in a spool directory.
    Verify {
        /// An NDJSON export or spool segment, or a spool directory, instead of the control plane.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(
            long = "control-plane",
            env = "ARBITER_CONTROL_PLANE",
            required_unless_present = "file"
        )]
        control_plane: Option<String>,
        #[arg(
            long,
            env = "ARBITER_CONTROL_PLANE_TOKEN",
            hide_env_values = true,
            default_value = ""
        )]
        token: String,
        #[arg(long, env = "ARBITER_CONTROL_PLANE_CA")]
        ca: Option<PathBuf>,
        /// Only this sidecar instance (default: every instance); with
        /// --file and --head, whose chain the head is of.
        #[arg(long)]
        instance: Option<String>,
        /// With --file: the chain must reach this head (`SEQ:HASH`, as
        /// `log verify` printed it), so records cut from its end show.
        #[arg(long, requires = "file")]
        head: Option<String>,
    },
}

#[derive(Args)]
struct ControlPlaneArgs {
    /// Listen address.
    #[arg(
        long,
        env = "ARBITER_CONTROL_PLANE_ADDR",
        default_value = "127.0.0.1:8181"
    )]
    addr: std::net::SocketAddr,
    /// The SQLite database holding bundles.
    #[arg(
        long,
        env = "ARBITER_CONTROL_PLANE_DB",
        default_value = ".arbiter/control-plane.db"
    )]
    db: PathBuf,
    /// Public key (PEM) whose signatures are accepted on publish; repeat for rotation.
    #[arg(
        long = "trusted-key",
        env = "ARBITER_TRUSTED_KEYS",
        value_delimiter = ',',
        required = true
    )]
    trusted_keys: Vec<PathBuf>,
    /// Bearer token operators must present to publish and roll back.
    #[arg(long, env = "ARBITER_CONTROL_PLANE_TOKEN", hide_env_values = true)]
    token: String,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "ARBITER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "ARBITER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Token sidecars must present to read bundles and on the gRPC services
    /// (records, signals, approvals); without it those are open to anyone
    /// reaching the port.
    #[arg(long, env = "ARBITER_SIDECAR_TOKEN", hide_env_values = true)]
    sidecar_token: Option<String>,
    /// How long an approval request stays open, and a grant usable (seconds).
    #[arg(long, env = "ARBITER_APPROVAL_TTL_SECS", default_value_t = 900)]
    approval_ttl_secs: u64,
    /// Days decision records are kept (checked hourly); 0 keeps them forever.
    #[arg(long, env = "ARBITER_RETAIN_DAYS", default_value_t = 0)]
    retain_days: u64,
    /// Log level filter.
    #[arg(long, env = "ARBITER_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Args)]
struct TestArgs {
    /// The bundle directory.
    dir: PathBuf,
    /// Also write a JUnit XML report here.
    #[arg(long)]
    junit: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, env = "ARBITER_CONFIG")]
    config: Option<PathBuf>,
    /// Bundle to serve: a directory, or a signed archive (needs --trusted-key).
    #[arg(long, env = "ARBITER_BUNDLE")]
    bundle: Option<PathBuf>,
    /// Public key (PEM) whose signatures are accepted; repeat for rotation.
    #[arg(
        long = "trusted-key",
        env = "ARBITER_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Vec<PathBuf>,
    /// Pull the bundle from this control plane (with --bundle-name).
    #[arg(long = "control-plane", env = "ARBITER_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Name of the bundle to pull from the control plane.
    #[arg(long, env = "ARBITER_BUNDLE_NAME")]
    bundle_name: Option<String>,
    /// Or pull the archive from this URL on any HTTP server.
    #[arg(long, env = "ARBITER_BUNDLE_URL")]
    bundle_url: Option<String>,
    /// Certificate authority (PEM) an https control plane must chain to.
    #[arg(long = "control-plane-ca", env = "ARBITER_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// This sidecar's token for the control plane (bundle reads, gRPC services).
    #[arg(long, env = "ARBITER_SIDECAR_TOKEN", hide_env_values = true)]
    sidecar_token: Option<String>,
    /// Where the last-known-good bundle is kept [default: .arbiter/bundles].
    #[arg(long, env = "ARBITER_BUNDLE_CACHE")]
    bundle_cache: Option<PathBuf>,
    /// Milliseconds between polls [default: 10000].
    #[arg(long, env = "ARBITER_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// Seconds a pulled bundle may go unconfirmed before it is stale (0 = never).
    #[arg(long, env = "ARBITER_MAX_BUNDLE_AGE_SECS")]
    max_bundle_age_secs: Option<u64>,
    /// What a stale bundle does [default: serve-stale].
    #[arg(long, env = "ARBITER_FAIL_MODE")]
    fail_mode: Option<arbiter::distribution::FailMode>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "ARBITER_GRPC_ADDR")]
    grpc_addr: Option<std::net::SocketAddr>,
    /// HTTP (metrics, health) listen address [default: 127.0.0.1:9464].
    #[arg(long, env = "ARBITER_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// Log level filter, e.g. `info` or `arbiter=debug`.
    #[arg(long, env = "ARBITER_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "ARBITER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Decisions kept in the decision cache (0 = off).
    #[arg(long, env = "ARBITER_CACHE_ENTRIES")]
    cache_entries: Option<u64>,
    /// Ship decision records to this control plane [default: --control-plane].
    #[arg(long, env = "ARBITER_DECISION_LOG_TO")]
    decision_log_to: Option<String>,
    /// Also write decision records to this NDJSON file (`-` = stdout).
    #[arg(long, env = "ARBITER_DECISION_LOG_FILE")]
    decision_log_file: Option<PathBuf>,
    /// The decision log spool directory [default: .arbiter/decisions].
    #[arg(long, env = "ARBITER_DECISION_LOG_SPOOL")]
    decision_log_spool: Option<PathBuf>,
    /// Also export records and spans to this OTLP/gRPC collector.
    #[arg(long, env = "ARBITER_DECISION_LOG_OTLP")]
    decision_log_otlp: Option<String>,
    /// When an answer may leave [default: buffered].
    #[arg(long, env = "ARBITER_DECISION_LOG_DURABILITY")]
    decision_log_durability: Option<arbiter::decision_log::Durability>,
}

#[derive(Args)]
struct CheckArgs {
    /// JSON request file (AuthZEN shape), or `-` for stdin.
    request: PathBuf,
    /// Bundle directory or signed archive to evaluate against offline.
    #[arg(long, conflicts_with = "addr", required_unless_present = "addr")]
    bundle: Option<PathBuf>,
    /// Public key (PEM) to verify an archive with.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// Send to a running sidecar instead, e.g. `http://127.0.0.1:50051`.
    #[arg(long)]
    addr: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Exit 1 unless the outcome is this (ALLOW, DENY, STEP_UP, APPROVAL_REQUIRED).
    #[arg(long)]
    expect: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Bundle(cmd) => bundle(cmd),
        Command::ControlPlane(args) => control_plane(args),
        Command::Signal(cmd) => signal(cmd),
        Command::Approval(cmd) => approval(cmd),
        Command::Test(args) => match arbiter::cli::bundle::test(&args.dir, args.junit.as_deref()) {
            Ok((text, passed)) => {
                print!("{text}");
                if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(f) => failure(f),
        },
        Command::Log(cmd) => log(cmd),
        Command::Bench(args) => arbiter::bench::run(args),
        Command::BenchEcho(args) => arbiter::bench::run_echo(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => return usage(e),
        },
        None => Config::default(),
    };
    if let Some(v) = args.bundle {
        config.bundle.path = Some(v);
    }
    if !args.trusted_keys.is_empty() {
        config.bundle.trusted_keys = args.trusted_keys;
    }
    let cp = &mut config.control_plane;
    if let Some(v) = args.control_plane {
        cp.url = Some(v);
    }
    if let Some(v) = args.bundle_name {
        cp.bundle_name = Some(v);
    }
    if let Some(v) = args.bundle_url {
        cp.bundle_url = Some(v);
    }
    if let Some(v) = args.bundle_cache {
        cp.cache_dir = v;
    }
    if let Some(v) = args.control_plane_ca {
        cp.ca_file = Some(v);
    }
    if let Some(v) = args.sidecar_token {
        cp.sidecar_token = Some(v);
    }
    if let Some(v) = args.poll_interval_ms {
        cp.poll_interval_ms = v;
    }
    if let Some(v) = args.max_bundle_age_secs {
        cp.max_bundle_age_secs = v;
    }
    if let Some(v) = args.fail_mode {
        cp.fail_mode = v;
    }
    if let Some(v) = args.grpc_addr {
        config.server.grpc_addr = v;
    }
    if let Some(v) = args.http_addr {
        config.server.http_addr = v;
    }
    if let Some(v) = args.log_level {
        config.log.level = v;
    }
    if let Some(v) = args.log_format {
        config.log.format = v;
    }
    let d = &mut config.decision_log;
    if let Some(v) = args.decision_log_to {
        d.ship_to = Some(v);
    }
    if let Some(v) = args.decision_log_file {
        d.file = Some(v);
    }
    if let Some(v) = args.decision_log_spool {
        d.spool_dir = v;
    }
    if let Some(v) = args.decision_log_otlp {
        d.otlp_endpoint = Some(v);
    }
    if let Some(v) = args.decision_log_durability {
        d.durability = v;
    }
    if let Some(v) = args.cache_entries {
        config.cache.max_entries = v;
    }
    if let Err(e) = config.validate() {
        return usage(e);
    }
    init_logging(&config.log.level, config.log.format);

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(arbiter::server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (arbiter::server::ServeError::BundleRead(_)
            | arbiter::server::ServeError::BundleInvalid(_)
            | arbiter::server::ServeError::BundleRefused { .. }),
        ) => {
            tracing::error!("refusing to start: {e}");
            ExitCode::from(EXIT_DATAERR)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let report = match (&args.addr, &args.bundle) {
        (Some(addr), _) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(arbiter::cli::check::remote(addr, &args.request)),
            Err(e) => Err(format!("cannot start the runtime: {e}")),
        },
        (None, Some(bundle)) => {
            arbiter::cli::check::offline(bundle, &args.trusted_keys, &args.request)
        }
        (None, None) => Err("pass `--bundle DIR` or `--addr URL`".into()),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.render());
    }
    match args.expect {
        Some(want) if !want.eq_ignore_ascii_case(&report.outcome) => {
            eprintln!("expected {want}, got {}", report.outcome);
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

fn control_plane(args: ControlPlaneArgs) -> ExitCode {
    if args.token.len() < 16 {
        return usage("the control plane token must be at least 16 characters");
    }
    if args.sidecar_token.as_ref().is_some_and(|t| t.len() < 16) {
        return usage("the sidecar token must be at least 16 characters");
    }
    let trusted = match arbiter::bundle::keys::TrustedKeys::load(&args.trusted_keys) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    init_logging(&args.log_level, args.log_format);
    let settings = arbiter::controlplane::server::Settings {
        addr: args.addr,
        db: args.db,
        trusted,
        token: args.token,
        limits: arbiter::bundle::ArchiveLimits::default(),
        tls: args.tls_cert.zip(args.tls_key),
        approval_ttl: std::time::Duration::from_secs(args.approval_ttl_secs.max(1)),
        sidecar_token: args.sidecar_token,
        retention: (args.retain_days > 0)
            .then(|| std::time::Duration::from_secs(args.retain_days.saturating_mul(86_400))),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(arbiter::controlplane::server::serve(
        settings,
        arbiter::server::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn bundle(cmd: BundleCommand) -> ExitCode {
    use arbiter::cli::bundle as b;
    let result = match cmd {
        BundleCommand::Build { dir, out, sign_key } => b::build(&dir, &out, sign_key.as_deref()),
        BundleCommand::Keygen { out } => b::keygen(&out),
        BundleCommand::Sign { file, key, out } => b::sign(&file, &key, out.as_deref()),
        BundleCommand::Inspect { file, trusted_keys } => b::inspect(&file, &trusted_keys),
        BundleCommand::Push {
            file,
            to,
            token,
            ca,
        } => b::push(&file, &to, &token, ca.as_deref()),
        BundleCommand::Rollback {
            name,
            revision,
            control_plane,
            token,
            ca,
        } => b::rollback(&name, &revision, &control_plane, &token, ca.as_deref()),
        BundleCommand::Revisions {
            name,
            control_plane,
            token,
            ca,
        } => b::revisions(&name, &control_plane, &token, ca.as_deref()),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => failure(f),
    }
}

fn log(cmd: LogCommand) -> ExitCode {
    use arbiter::cli::log;
    fn source(s: &TrailSource) -> arbiter::cli::log::Source<'_> {
        arbiter::cli::log::Source {
            url: &s.control_plane,
            token: &s.token,
            ca: s.ca.as_deref(),
        }
    }
    let result = match cmd {
        LogCommand::Show {
            decision_id,
            source: s,
            json,
        } => log::show(&source(&s), &decision_id, json),
        LogCommand::Query {
            source: s,
            since,
            until,
            subject,
            subject_type,
            resource,
            resource_type,
            outcome,
            policy,
            instance,
            forked,
            limit,
            json,
        } => {
            let filter = arbiter::controlplane::trail::Filter {
                since,
                until,
                instance,
                subject,
                subject_type,
                resource,
                resource_type,
                outcome,
                policy,
                forked: forked.then_some(true),
                limit: Some(limit),
            };
            log::query(&source(&s), &filter, json)
        }
        LogCommand::Verify {
            file: Some(file),
            instance,
            head,
            ..
        } => log::verify_file(&file, instance.as_deref(), head.as_deref()),
        LogCommand::Verify {
            control_plane,
            token,
            ca,
            instance,
            ..
        } => log::verify_remote(
            &log::Source {
                url: control_plane.as_deref().unwrap_or_default(),
                token: &token,
                ca: ca.as_deref(),
            },
            instance.as_deref(),
        ),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => failure(f),
    }
}

fn trail_source(s: &TrailSource) -> arbiter::cli::log::Source<'_> {
    arbiter::cli::log::Source {
        url: &s.control_plane,
        token: &s.token,
        ca: s.ca.as_deref(),
    }
}

fn print_result(result: Result<String, arbiter::cli::bundle::Failure>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => failure(f),
    }
}

fn signal(cmd: SignalCommand) -> ExitCode {
    use arbiter::cli::journeys;
    let SignalCommand::Send {
        kind,
        value,
        session,
        subject,
        reason,
        source,
    } = cmd;
    let value = value.map(|v| v.replace("not-compliant", "not_compliant"));
    print_result(journeys::send_signal(
        &trail_source(&source),
        &journeys::SignalArgs {
            kind: &kind,
            session: session.as_deref(),
            subject: subject.as_deref(),
            value: value.as_deref(),
            reason: reason.as_deref(),
        },
    ))
}

fn approval(cmd: ApprovalCommand) -> ExitCode {
    use arbiter::cli::journeys;
    print_result(match cmd {
        ApprovalCommand::List {
            state,
            json,
            source,
        } => journeys::list_approvals(&trail_source(&source), state.as_deref(), json),
        ApprovalCommand::Approve { id, by, source } => {
            journeys::decide_approval(&trail_source(&source), &id, true, &by)
        }
        ApprovalCommand::Deny { id, by, source } => {
            journeys::decide_approval(&trail_source(&source), &id, false, &by)
        }
    })
}

fn failure(f: arbiter::cli::bundle::Failure) -> ExitCode {
    eprintln!("error: {}", f.message);
    ExitCode::from(f.code)
}

fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_USAGE)
}
