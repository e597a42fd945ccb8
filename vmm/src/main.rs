//! The `vmm` binary.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::{exit_code, report, run};

fn write_json(path: &std::path::Path, r: &report::RunReport) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(r).context("serializing the run report")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Bench(args) => vmm::bench::run_cli(&args),
        Command::Stress(args) => vmm::stress::run_cli(&args),
        Command::Ctl(args) => match vmm::api::ctl(&args) {
            Ok(text) => {
                print!("{text}");
                exit_code::OK
            }
            Err(e) => {
                eprintln!("vmm ctl: error: {e}");
                e.exit_code()
            }
        },
        Command::Run(args) => match run::run(&args) {
            Ok(rep) => {
                if rep.exit_code != exit_code::OK {
                    eprintln!("vmm: {}", rep.outcome);
                }
                if args.stats {
                    print!("{}", report::stats_text(&rep));
                }
                match args.stats_json.as_deref().map(|p| write_json(p, &rep)) {
                    Some(Err(e)) => {
                        eprintln!("vmm: {e:#}");
                        exit_code::INTERNAL
                    }
                    _ => rep.exit_code,
                }
            }
            Err(e) => {
                eprintln!("vmm: error: {e}");
                e.exit_code()
            }
        },
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
