//! `flare-loadgen`: see `flare-loadgen --help` and the crate documentation.

use clap::Parser;

fn main() {
    let cli = flare_loadgen::cli::Cli::parse();
    std::process::exit(flare_loadgen::coordinator::main_with(cli));
}
