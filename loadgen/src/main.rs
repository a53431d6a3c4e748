//! `flare-loadgen`: not built yet (issue "flare-loadgen and the side-by-side
//! benchmark"). The binary exists so the workspace has its final shape; it says
//! so instead of pretending to measure anything.

fn main() {
    eprintln!("flare-loadgen is not implemented yet; see README.md \"What is not done yet\"");
    std::process::exit(2);
}
