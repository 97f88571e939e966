//! The `spliced` command.
use clap::Parser;

#[derive(Parser)]
#[command(version, about)]
enum Cli {
    /// Run the proxy.
    Run,
}

fn main() -> anyhow::Result<()> {
    let Cli::Run = Cli::parse();
    let k = spliced::ebpf::Kernel::load()?;
    println!("{:?}", k.program_names());
    Ok(())
}
