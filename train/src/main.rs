//! `massv-train`: not implemented yet (see the training issue); it says so and exits non-zero.
use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("error: massv-train has no commands yet (projector, distill-data, sdvit and tvd are planned)");
    ExitCode::FAILURE
}
