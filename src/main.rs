//! The `sluice` command: parse flags, load the configuration, run the server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::app::{build_server, RunOptions};
use sluice::config::{Config, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of the system allocator: a request allocates and frees many small blocks
/// (header maps, buffers, futures), where glibc's malloc cost a tenth of the proxy's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An egress proxy that paces, shares and routes outbound API calls.
#[derive(Parser, Debug)]
#[command(name = "sluice", version)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded default is used.
    #[arg(short, long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print every error, and exit (non-zero if invalid).
    #[arg(long)]
    check: bool,
    /// Run in the background (Pingora daemon mode).
    #[arg(short, long)]
    daemon: bool,
    /// Take over the listeners of a running sluice (graceful upgrade).
    #[arg(short, long)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The CA of TLS interception (`[intercept]`).
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Write a new CA to DIR (ca.pem, and ca.key with mode 0600) and say how to trust it.
    Init { dir: PathBuf },
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    let result = match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
    .and_then(|config| {
        sluice::intercept::Interceptor::check(&config.intercept)?;
        Ok(config)
    });
    result.map_err(|e| {
        let source = path.map_or("embedded default".to_string(), |p| p.display().to_string());
        format!("{source}: invalid configuration:\n{e}")
    })
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Ca {
        what: CaCommand::Init { dir },
    }) = &cli.command
    {
        return Ok(match sluice::intercept::ca::init(dir) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice ca init: {e}");
                ExitCode::from(2)
            }
        });
    }
    let config = match load(cli.config.as_ref()) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("{message}");
            return Ok(ExitCode::from(2));
        }
    };
    if cli.check {
        let source = cli
            .config
            .as_ref()
            .map_or("embedded default".to_string(), |p| p.display().to_string());
        for warning in config
            .server
            .warnings()
            .into_iter()
            .chain(config.intercept.warnings())
        {
            eprintln!("warning: {warning}");
        }
        println!("{source}: configuration is valid");
        println!(
            "rate-limit headers read from upstream responses: {}",
            sluice::admission::hints::NAMES.join(", ")
        );
        // A wildcard listener is reached at this machine's own address.
        let listen = match config.server.listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => format!("THIS-HOST:{}", a.port()),
            _ => config.server.listen.clone(),
        };
        println!(
            "point clients at it with http_proxy=http://{listen} and https_proxy=http://{listen} \
             (http:// in both: an HTTPS call's own TLS goes inside the CONNECT tunnel)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(&config.server.log_level, config.server.log_format);
    tracing::info!(
        listen = config.server.listen.as_str(),
        admin = config.server.admin_listen.as_str(),
        threads = config.worker_threads(),
        "sluice starting"
    );
    let options = RunOptions {
        daemon: cli.daemon,
        upgrade: cli.upgrade,
    };
    let server = build_server(config, cli.config.clone(), options)
        .map_err(anyhow::Error::msg)
        .context("cannot start")?;
    server.run_forever()
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(1)
        }
    }
}
