//! The `vmm` binary.

use std::process::ExitCode;

mod cli;

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command};
use vmm::config::RunConfig;
use vmm::{exit_code, report, run};

fn write_json(path: &std::path::Path, r: &report::RunReport) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(r).context("serializing the run report")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Bench(args) => vmm::bench::run_cli(&args.into()),
        Command::Stress(args) => vmm::stress::run_cli(&args.into()),
        Command::Ctl(args) => {
            match vmm::api::ctl(&args.api_socket, args.json, &(&args.command).into()) {
                Ok(text) => {
                    vmm::stdout::print(&text);
                    exit_code::OK
                }
                Err(e) => {
                    eprintln!("vmm ctl: error: {e}");
                    e.exit_code()
                }
            }
        }
        Command::Run(args) => {
            let cfg = RunConfig::from(args);
            match run::run(&cfg) {
                Ok(rep) => {
                    if rep.exit_code != exit_code::OK {
                        eprintln!("vmm: {}", rep.outcome);
                    }
                    // The report file first: stdout may be a closed pipe.
                    let written = cfg.stats_json.as_deref().map(|p| write_json(p, &rep));
                    if cfg.stats {
                        vmm::stdout::print(&report::stats_text(&rep));
                    }
                    match written {
                        // The path was checked before the run; a failure now
                        // keeps the run's own outcome when it has one.
                        Some(Err(e)) => {
                            eprintln!("vmm: {e:#}");
                            if rep.exit_code == exit_code::OK {
                                exit_code::INTERNAL
                            } else {
                                rep.exit_code
                            }
                        }
                        _ => rep.exit_code,
                    }
                }
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    e.exit_code()
                }
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
