//! The `fm` binary: parse the command line, run, print the error once, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fm::cli::Cli::parse();
    match fm::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fm: {err:#}");
            ExitCode::from(fm::error::exit_code_of(&err))
        }
    }
}
