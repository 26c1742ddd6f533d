//! The kernel's random number generator from the shell, for the clone test
//! under QEMU (`tests/vm`, scenario n), whose busybox guest has no tool for
//! either:
//!
//! ```text
//! sysgenid-rng reseed   # force a CRNG reseed (RNDRESEEDCRNG), through the daemon's own wrapper
//! sysgenid-rng get N    # print N bytes (1..=64) of getrandom(2) in hex
//! ```
//! `reseed` prints what `sysgenidd` would put in status and exits 1 when
//! the kernel refused.

use std::process::ExitCode;

use sysgenidd::reseed::{KernelRng, Policy};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["reseed"] => {
            let status = KernelRng::open(Policy::Always).renew(None, false);
            match status.not_reseeded_because {
                None => {
                    println!("reseeded");
                    ExitCode::SUCCESS
                }
                Some(why) => {
                    println!("not reseeded: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        ["get", n] => match n.parse::<usize>() {
            Ok(n @ 1..=64) => {
                let mut bytes = vec![0u8; n];
                if let Err(e) = getrandom::fill(&mut bytes) {
                    eprintln!("sysgenid-rng: getrandom: {e}");
                    return ExitCode::FAILURE;
                }
                println!(
                    "{}",
                    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
                );
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("sysgenid-rng: get N: N is 1 to 64");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: sysgenid-rng reseed | sysgenid-rng get N");
            ExitCode::from(2)
        }
    }
}
