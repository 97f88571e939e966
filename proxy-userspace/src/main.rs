//! The `spliced` command: `run`, `check`, `upgrade`, `--version`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser};
use spliced::{Config, ConfigTable, Server};

mod docs;

#[derive(Parser)]
#[command(
    name = "spliced",
    version,
    about = "SNI/Host routing edge proxy with kernel splicing"
)]
enum Cli {
    /// Run the proxy with a configuration file.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// How long open connections may finish after SIGTERM.
        #[arg(long, default_value = "10", value_name = "SECONDS")]
        grace: u64,
        /// bpffs directory where the eBPF maps are pinned for bpftool; "none" to not pin.
        #[arg(long, default_value = proxy_common::PIN_DIR, value_name = "DIR")]
        pin_dir: String,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Unix socket from which a new spliced (--upgrade-from) takes the listening sockets
        /// over; "none" for no socket (then upgrades refuse connections). Default:
        /// /run/spliced/spliced.sock, left out with a warning if it cannot be made.
        #[arg(long, value_name = "PATH")]
        control_socket: Option<String>,
        /// Take the listening sockets over from the spliced serving this control socket: it
        /// stops accepting once this one is ready, drains its connections and exits.
        #[arg(long, value_name = "PATH")]
        upgrade_from: Option<PathBuf>,
        /// Append the access log to FILE instead of standard output; SIGUSR1 reopens it (for
        /// logrotate).
        #[arg(long, value_name = "FILE")]
        access_log: Option<PathBuf>,
        /// How the access log and the diagnostics on standard error are written: text, or one
        /// JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration file and print a summary; exits non-zero if it is invalid.
    /// With --against or --previous, also print what a reload would change.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Compare with the configuration a running spliced serves (at /config on its
        /// --metrics address, e.g. 127.0.0.1:9464): the sites added, removed and changed.
        #[arg(long, value_name = "ADDR", conflicts_with = "previous")]
        against: Option<std::net::SocketAddr>,
        /// Compare with another configuration file (e.g. the one before an edit).
        #[arg(long, value_name = "FILE")]
        previous: Option<PathBuf>,
    },
    /// Print a running spliced's state from its metrics endpoint: listeners, sites,
    /// connections by engine, outcomes, kernel and XDP counters. Exits non-zero if nothing
    /// answers.
    Status {
        /// The --metrics address of the running spliced.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        metrics: std::net::SocketAddr,
    },
    /// Upgrade without refused connections: the running spliced starts its own binary again
    /// (the installed one, from the path it was started with) with its own arguments, and
    /// hands its listening sockets over once that process is ready; then it drains and exits.
    /// Under systemd the new process stays in the service and becomes its main process. Exits
    /// 0 once the new process serves; 1 if the upgrade failed (the running process serves on);
    /// 3 if nothing was tried (no spliced answers, or it is a version without this request).
    Upgrade {
        /// The running spliced's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET, value_name = "PATH")]
        control_socket: PathBuf,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "90", value_name = "SECONDS")]
        timeout: u64,
    },
    /// Write the man pages and the bash, zsh and fish completions into a directory (for
    /// packaging: `cargo xtask deb` runs it).
    #[command(hide = true)]
    GenerateDocs {
        /// Where `man8/` and `completions/` go.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

/// Where the running instance serves its control socket unless told otherwise.
const DEFAULT_CONTROL_SOCKET: &str = "/run/spliced/spliced.sock";

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `key=value` access-log lines; human-readable diagnostics.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Diagnostics on standard error, in `format`, filtered by `RUST_LOG` (default `info`).
fn init_diagnostics(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per event: the message and its fields under "fields", plus "timestamp",
        // "level" and "target".
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_diagnostics(match &cli {
        Cli::Run { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    });
    match cli {
        Cli::Check {
            config,
            against,
            previous,
        } => match Config::load(&config) {
            Ok(cfg) => {
                println!("{}: OK\n{}", config.display(), cfg.summary());
                match spliced::packet_preflight(&cfg) {
                    Some((true, Ok(summary))) => println!("{summary}"),
                    Some((false, Ok(summary))) => {
                        println!("{summary}; auto uses it (the [packet] section's after)");
                    }
                    Some((true, Err(e))) => {
                        eprintln!(
                            "spliced check: forwarding = \"packet\" is configured but the packet \
                             engine cannot start here: {e:#}"
                        );
                        return ExitCode::from(1);
                    }
                    // Not an error: auto runs without the engine, as `run` will say.
                    Some((false, Err(e))) => {
                        println!(
                            "packet engine: cannot start here, so auto runs without it (splice, \
                             then sockmap): {e:#}"
                        );
                    }
                    None => {}
                }
                let running = match (against, previous) {
                    (Some(addr), _) => spliced::status::fetch(addr, "/config")
                        .and_then(|text| {
                            ConfigTable::from_text(&text).ok_or_else(|| {
                                anyhow::anyhow!("http://{addr}/config is not a configuration table")
                            })
                        })
                        .map(|t| (t, format!("the running spliced at {addr}"))),
                    (None, Some(path)) => Config::load(&path)
                        .map(|c| (ConfigTable::of(&c), path.display().to_string()))
                        .map_err(anyhow::Error::from),
                    (None, None) => return ExitCode::SUCCESS,
                };
                match running {
                    Ok((before, what)) => {
                        println!(
                            "changes from {what}:\n{}",
                            before.diff(&ConfigTable::of(&cfg))
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("spliced check: cannot compare: {e:#}");
                        ExitCode::from(1)
                    }
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cli::Upgrade {
            control_socket,
            timeout,
        } => match spliced::ask_to_upgrade(&control_socket, Duration::from_secs(timeout)) {
            Ok(spliced::Upgraded::Done(pid)) => {
                println!("upgraded: PID {pid} serves; the old process drains its connections");
                ExitCode::SUCCESS
            }
            Ok(spliced::Upgraded::Failed(why)) => {
                eprintln!("spliced: upgrade failed: {why}");
                ExitCode::from(1)
            }
            Ok(spliced::Upgraded::Refused(why)) => {
                eprintln!("spliced: the running spliced did not start an upgrade: {why}");
                ExitCode::from(3)
            }
            Err(e) => {
                eprintln!("spliced: {e:#}");
                // Nothing was asked if we could not connect; otherwise the outcome is unknown.
                let connected = !format!("{e:#}").starts_with("connecting to the control socket");
                ExitCode::from(if connected { 1 } else { 3 })
            }
        },
        Cli::GenerateDocs { out_dir } => match docs::write(&Cli::command(), &out_dir) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spliced: {e:#}");
                ExitCode::from(1)
            }
        },
        Cli::Status { metrics } => match spliced::status::fetch(metrics, "/metrics") {
            Ok(text) => {
                print!("{}", spliced::status::Scrape::parse(&text).report(metrics));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spliced status: {e:#}");
                ExitCode::from(1)
            }
        },
        Cli::Run {
            config,
            grace,
            pin_dir,
            metrics,
            control_socket,
            upgrade_from,
            access_log,
            log_format,
        } => {
            let options = spliced::Options {
                pin_dir: (pin_dir != "none").then(|| PathBuf::from(pin_dir)),
                metrics,
                control_socket: match control_socket.as_deref() {
                    None => Some(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
                    Some("none") => None,
                    Some(path) => Some(PathBuf::from(path)),
                },
                control_socket_optional: control_socket.is_none(),
                upgrade_from,
                access_log,
                log_format: match log_format {
                    LogFormat::Text => spliced::LogFormat::Text,
                    LogFormat::Json => spliced::LogFormat::Json,
                },
                // The path as started (argv[0]), not /proc/self/exe: after a package upgrade
                // that is the replaced file, and the new binary is at the path.
                respawn: Some(spliced::without_upgrade_from(std::env::args_os())),
            };
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            };
            match run(cfg, config, Duration::from_secs(grace), &options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spliced: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn run(
    config: Config,
    path: PathBuf,
    grace: Duration,
    options: &spliced::Options,
) -> anyhow::Result<()> {
    // Control only: connections run on the server's workers, one runtime per CPU.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::bind(config, Some(path), options)?;
        server.run(grace).await
    })
}
