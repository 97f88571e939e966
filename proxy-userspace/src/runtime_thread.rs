//! A thread that runs its own single-threaded tokio runtime until told to stop: the connection
//! workers (one per CPU) and the DNS resolver each run on one.
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::oneshot;

/// A running runtime thread: spawn work on `handle`; dropping or sending on `stop` ends it.
pub(crate) struct RuntimeThread {
    pub handle: tokio::runtime::Handle,
    pub stop: oneshot::Sender<()>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts thread `name` with a current-thread runtime (I/O and timers enabled), and returns
/// once the runtime runs. When stopped, the runtime waits at most `shutdown` for blocking
/// tasks still running.
pub(crate) fn start(name: String, shutdown: Duration) -> Result<RuntimeThread> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(runtime.handle().clone()));
            // The runtime runs its tasks while this waits.
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
            runtime.shutdown_timeout(shutdown);
        })
        .with_context(|| format!("starting thread {name}"))?;
    let handle = handle_rx
        .recv()
        .with_context(|| format!("thread {name} ended while starting"))?
        .with_context(|| format!("starting the runtime of thread {name}"))?;
    Ok(RuntimeThread {
        handle,
        stop,
        thread,
    })
}
