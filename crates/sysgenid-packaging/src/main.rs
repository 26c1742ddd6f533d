//! `cargo run -p sysgenid-packaging`: rewrites the generated man pages and
//! completions under `packaging/` from the clap definitions.

fn main() -> std::io::Result<()> {
    for path in sysgenid_packaging::write_all(&sysgenid_packaging::workspace_root())? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
