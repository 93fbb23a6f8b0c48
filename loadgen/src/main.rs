//! loadgen: opens many WebSocket/TCP connections to a Chatify deployment, sends at a target
//! rate and reports connect rate, throughput and send→ack / send→deliver percentiles.
//! Only the command line exists so far; the load engine arrives with issue 7.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// loadgen command line.
#[derive(Debug, clap::Parser)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// Gateway WebSocket URL, e.g. ws://127.0.0.1:8080/ws.
    #[arg(long, env = "LOADGEN_TARGET", default_value = "ws://127.0.0.1:8080/ws")]
    target: String,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    anyhow::bail!(
        "loadgen cannot generate load yet (target {}): the engine arrives with issue 7",
        args.target
    )
}
