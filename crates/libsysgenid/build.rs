//! Gives the shared library a versioned SONAME, `libsysgenid.so.0`, so
//! programs linked against it keep loading the ABI-compatible 0.x series.
//! `install.sh` installs `libsysgenid.so.0.<minor>.<patch>` with the
//! `.so.0` and `.so` symlinks.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsysgenid.so.0");
}
