//! `include/moe_runner.h` is what cbindgen generates from the crate today.

#[test]
fn the_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
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
