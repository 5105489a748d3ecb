//! The `peerwire` command: run a node, talk to nodes (call, notify, publish, subscribe,
//! gather) with JSON at the edge, the demo, and transport tools (`probe`, `zmtp-echo`).

/// `println!` for the command's output: when the reader has gone (piped into `head` and
/// closed), the command ends quietly with status 141, as Unix tools do, instead of
/// panicking. (SIGPIPE itself stays ignored: sockets must see EPIPE, not die of it.)
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(141);
        }
    }};
}

/// `eprintln!` that never panics: a node whose stderr reader went away keeps running.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod cli;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use peerwire::transport::{
    display_identity, Dealer, Router, SocketEvent, SocketOptions, Subscriber,
};

#[derive(Parser)]
#[command(
    name = "peerwire",
    version,
    about = "Brokerless peer-to-peer messaging runtime"
)]
struct Cli {
    /// Runtime worker threads (1: everything on one thread, the cheapest for a node that
    /// shares a small machine with other processes). Default: one per CPU core.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start several nodes on loopback and show every interaction style.
    Demo,
    /// Run a node until Ctrl-C.
    Node {
        /// Node name.
        #[arg(long, default_value = "node")]
        name: String,
        /// ROUTER port (0: any).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// PUB port (0: any).
        #[arg(long, default_value_t = 0)]
        pub_port: u16,
        /// Built-in services to host: echo (echo.echo, echo.upper, echo.log,
        /// echo.broadcast, echo.ping), relay (relay.echo, which calls echo.echo under a
        /// short deadline, a breaker and a fallback) and sink (sink.take: a consumer for
        /// deliveries that handles each message id once and prints it). Repeatable.
        #[arg(long)]
        serve: Vec<String>,
        #[command(flatten)]
        faults: cli::services::Faults,
        #[command(flatten)]
        sink: cli::services::SinkArgs,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// List the peers and what they serve (--watch: follow them as they come and go).
    Peers {
        /// Print JSON instead of a table (with --watch, one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Keep running and print every peer that joins, changes or leaves.
        #[arg(long)]
        watch: bool,
        /// With --watch, stop after this many events.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// Explain discovery: the interfaces mDNS uses, whether its packets go out and come
    /// back, which peers were seen, and which could not be reached and why.
    Doctor {
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// Request/response: call SERVICE.METHOD with a JSON request, print the JSON reply.
    Call {
        /// service.method
        target: String,
        /// The request, as JSON.
        json: String,
        #[command(flatten)]
        how: cli::call::CallArgs,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// One-way notification to one instance of SERVICE.METHOD.
    Notify {
        /// service.method
        target: String,
        /// The message, as JSON.
        json: String,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// At-least-once delivery of a JSON message to one instance of SERVICE.METHOD: sent
    /// again (elsewhere) until an instance acknowledges it; --outbox FILE keeps what is
    /// not acknowledged for the next run.
    Deliver {
        /// service.method
        target: String,
        /// The message, as JSON.
        json: String,
        #[command(flatten)]
        how: cli::outbox::DeliverArgs,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// List the messages an outbox file (`deliver --outbox`, `OutboxConfig::on_disk`)
    /// holds, not yet acknowledged.
    Outbox {
        /// The outbox file.
        file: std::path::PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Publish a JSON event on TOPIC.
    Publish {
        /// Topic.
        topic: String,
        /// The event, as JSON.
        json: String,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// Print events whose topic starts with TOPIC, one JSON line each.
    Subscribe {
        /// Topic prefix.
        topic: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// Publish a JSON request on TOPIC and print every reply until the window closes.
    Gather {
        /// Topic.
        topic: String,
        /// The request, as JSON.
        json: String,
        /// Collection window in milliseconds.
        #[arg(long, default_value_t = 1000)]
        within: u64,
        /// Stop as soon as this many replies are in.
        #[arg(long)]
        quorum: Option<usize>,
        #[command(flatten)]
        net: cli::NodeArgs,
    },
    /// Latency and throughput between two processes: `bench serve` on one side, `bench
    /// run --peer ENDPOINT` on the other (request/reply, notifications, pub/sub, gather,
    /// and a raw TCP baseline between the same two processes).
    Bench {
        #[command(subcommand)]
        what: cli::bench::BenchCommand,
    },
    /// CURVE key pairs: create one (`keys new NAME`), show a public key (`keys show FILE`),
    /// make a cluster secret (`keys secret FILE`).
    Keys {
        #[command(subcommand)]
        what: cli::keys::KeysCommand,
    },
    /// Connect to a ZMTP endpoint, complete the handshake, and print what the peer announced.
    Probe {
        /// Endpoint, e.g. tcp://127.0.0.1:5555.
        endpoint: String,
        /// Socket type to connect as.
        #[arg(long = "as", value_enum, default_value_t = ProbeAs::Dealer)]
        as_type: ProbeAs,
        /// How long to wait for the handshake, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Run a bare ZMTP ROUTER that echoes every message back to its sender, until Ctrl-C.
    ZmtpEcho {
        /// Endpoint to bind; loopback by default.
        #[arg(long, default_value = "tcp://127.0.0.1:5555")]
        bind: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProbeAs {
    /// Probe a ROUTER or DEALER.
    Dealer,
    /// Probe a PUB.
    Sub,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo runs mDNS for real, in a network of its own: set up before any thread.
    let demo_net = matches!(cli.command, Command::Demo).then(cli::isolate::private_network);
    let rt = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n as usize)
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli, demo_net));
    // What the node queued for stdout and stderr goes out first (bounded wait).
    cli::logging::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says: this is for people, not debuggers.
            errln!("error: {}", cli::logging::clean(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, demo_net: Option<Result<(), String>>) -> Result<()> {
    // The demo shows what it does in its own words; its nodes' warnings (a handler cut off
    // at a gather's deadline is part of the show) would land in the middle of them.
    // RUST_LOG still wins.
    // A one-shot command run with --insecure does not repeat the insecure node's warning
    // on every call (`peerwire node` does say it, once, as it starts).
    let default_filter = match cli.command {
        Command::Demo => "error",
        Command::Node { .. }
        | Command::Bench {
            what: cli::bench::BenchCommand::Serve { .. },
        } => "warn",
        _ => "warn,peerwire::insecure=error",
    };
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| default_filter.into());
        // Logs go through a queue to a writer thread (a stderr nobody reads never
        // blocks the node), one line each, at most 20 a second from one call site.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(|| cli::logging::stderr().clone())
            // Its own complaint about a failed write would go to the same stderr
            // through `eprintln!`, which panics when it is closed.
            .log_internal_errors(false)
            // Colours for a terminal only: a log file or a pipe gets plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(cli::logging::RateLimit::global());
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
    match cli.command {
        Command::Probe {
            endpoint,
            as_type,
            timeout_ms,
        } => probe(&endpoint, as_type, Duration::from_millis(timeout_ms)).await,
        Command::ZmtpEcho { bind } => echo(&bind).await,
        Command::Keys { what } => cli::keys::run(&what),
        Command::Bench { what } => cli::bench::run(what).await,
        Command::Demo => cli::demo::run(demo_net.unwrap_or(Err("not the demo".into()))).await,
        Command::Node {
            name,
            port,
            pub_port,
            serve,
            faults,
            sink,
            net,
        } => cli::run_node(&net, &name, port, pub_port, &serve, faults, &sink).await,
        Command::Peers {
            json,
            watch: true,
            count,
            net,
        } => cli::watch(&net, json, count).await,
        Command::Peers { json, net, .. } => cli::peers(&net, json).await,
        Command::Doctor { net } => cli::doctor::run(&net).await,
        Command::Call {
            target,
            json,
            how,
            net,
        } => cli::call::call(&net, &target, &json, &how).await,
        Command::Notify { target, json, net } => cli::notify(&net, &target, &json).await,
        Command::Deliver {
            target,
            json,
            how,
            net,
        } => cli::outbox::deliver(&net, &target, &json, &how).await,
        Command::Outbox { file, json } => cli::outbox::list(&file, json),
        Command::Publish { topic, json, net } => cli::publish(&net, &topic, &json).await,
        Command::Subscribe { topic, count, net } => cli::subscribe(&net, &topic, count).await,
        Command::Gather {
            topic,
            json,
            within,
            quorum,
            net,
        } => cli::gather(&net, &topic, &json, within, quorum).await,
    }
}

async fn probe(endpoint: &str, as_type: ProbeAs, bound: Duration) -> Result<()> {
    let opts = SocketOptions::default()
        .with_reconnect_initial(Duration::from_millis(100))
        .with_reconnect_max(Duration::from_millis(500));
    // Keep the socket alive while waiting; its events say how the handshake went.
    let (mut events, _dealer, _sub);
    match as_type {
        ProbeAs::Dealer => {
            let (d, ev) = Dealer::connect_with_events(endpoint, opts).context("bad endpoint")?;
            events = ev;
            _dealer = Some(d);
            _sub = None;
        }
        ProbeAs::Sub => {
            let s = Subscriber::new(opts);
            events = s.events();
            s.connect(endpoint).context("bad endpoint")?;
            _sub = Some(s);
            _dealer = None;
        }
    }
    let mut last_error = None;
    let outcome = tokio::time::timeout(bound, async {
        loop {
            match events.recv().await {
                Ok(SocketEvent::Connected {
                    addr,
                    identity,
                    socket_type,
                    minor_version,
                }) => return Ok((addr, identity, socket_type, minor_version)),
                Ok(SocketEvent::HandshakeFailed { addr, reason }) => {
                    return Err(format!("handshake with {addr} failed: {reason}"))
                }
                Ok(SocketEvent::ConnectFailed { error, .. }) => last_error = Some(error),
                Ok(_) => {}
                Err(e) => return Err(format!("event stream: {e}")),
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok((addr, identity, socket_type, minor))) => {
            outln!("endpoint     {endpoint}");
            outln!("address      {addr}");
            outln!("protocol     ZMTP 3.{minor}");
            outln!("socket type  {socket_type}");
            outln!(
                "identity     {}",
                if identity.is_empty() {
                    "(none)".to_string()
                } else {
                    display_identity(&identity)
                }
            );
            outln!(
                "heartbeats   {}",
                if minor >= 1 {
                    "PING/PONG"
                } else {
                    "not available (ZMTP 3.0)"
                }
            );
            Ok(())
        }
        Ok(Err(e)) => bail!("{endpoint}: {e}"),
        Err(_) => match last_error {
            Some(e) => bail!("{endpoint}: not reachable within {bound:?}: {e}"),
            None => bail!("{endpoint}: no handshake within {bound:?}"),
        },
    }
}

async fn echo(bind: &str) -> Result<()> {
    let router = Router::bind(bind, SocketOptions::default())
        .await
        .with_context(|| format!("cannot start the echo ROUTER on {bind}"))?;
    errln!("echo ROUTER listening on tcp://{}", router.local_addr());
    let mut stop = cli::StopSignal::new();
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            r = router.recv() => {
                let (id, msg) = r?;
                if let Err(e) = router.send(&id, msg).await {
                    errln!("reply to {} failed: {e}", display_identity(&id));
                }
            }
        }
    }
    router.close().await;
    Ok(())
}
