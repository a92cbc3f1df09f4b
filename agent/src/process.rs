//! Process plumbing shared by the `nebula-agent` and `nebula` binaries: logging set-up and
//! waiting for a stop signal.

/// `tracing` to stderr, filtered by `RUST_LOG` (default `info`); `json` or human text, coloured
/// only on a terminal (not in a log file or the journal).
///
/// The Docker client's debug output holds whole request bodies, a container's environment
/// (secret values) included: it stays at `info` unless `RUST_LOG` names `bollard` itself.
pub fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let filter = if spec.contains("bollard") {
        filter
    } else {
        filter.add_directive("bollard=info".parse().expect("a valid directive"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
