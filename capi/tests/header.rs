//! `include/moe_runner.h` is what cbindgen generates from the crate today.

/// The crate's directory: where cargo built this test, else `capi/` under the current directory
/// (a copy of the tree on another machine, run from its root).
fn crate_dir() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.is_dir() {
        built
    } else {
        std::path::PathBuf::from("capi")
    }
}

#[test]
fn the_header_is_current() {
    let dir = crate_dir();
    let dir = dir.display();
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    // The one source file, parsed without cargo (the GPU machine has no toolchain).
    cbindgen::Builder::new()
        .with_src(format!("{dir}/src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen parses the crate")
        .write(&mut generated);
    let path = format!("{dir}/include/moe_runner.h");
    let committed = std::fs::read(&path).unwrap_or_default();
    if std::env::var_os("MOE_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        committed == generated,
        "{path} is stale: run `MOE_BLESS_HEADER=1 cargo test -p moe-capi --test header`"
    );
}
