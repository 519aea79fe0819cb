//! Logging set-up shared by the Ballast binaries (DESIGN §7): `tracing` to stderr, text
//! or JSON, the level from `BALLAST_LOG`, else `RUST_LOG`, else `info`.

/// Installs the global subscriber; `format` is `text` or `json`. An invalid filter is
/// reported and `info` used instead.
pub fn init(format: &str) {
    let filter = std::env::var("BALLAST_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("ignoring invalid log filter {filter:?}: {e}");
        tracing_subscriber::EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
