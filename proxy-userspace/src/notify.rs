//! systemd's notify protocol (`sd_notify(3)`), for `Type=notify` units: readiness, reloads,
//! stopping, a one-line status, and the watchdog.
//!
//! Everything here does nothing when `NOTIFY_SOCKET` is unset, so spliced started by hand or by
//! the tests behaves as before. The messages go out through the `sd-notify` crate, which writes
//! one datagram per call; a failed send is logged and otherwise ignored: systemd not hearing
//! from us is its timeout to act on, not a reason to stop serving.
//!
//! The watchdog and the status line run as tasks on the control runtime (signals, reload,
//! `/metrics`), not on a thread of their own: if that loop wedges, the pings stop and systemd
//! restarts the service. Before each ping, every connection worker must also answer, so a
//! worker stuck in a blocking call stops the pings too.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use sd_notify::NotifyState;

use crate::shared::Shared;

/// How often the status line is recomputed; it is sent only when it changed.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What the service is doing, as the status line says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    Reloading,
    Stopping,
}

/// The link to systemd for one run of the server: inert without `NOTIFY_SOCKET`.
pub(crate) struct Systemd {
    enabled: bool,
    shared: Arc<Shared>,
    /// The phase and the last status line sent, shared with the status task.
    state: Arc<Mutex<(Phase, String)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Systemd {
    /// Starts the status task and, when `WATCHDOG_USEC` asks for it, the watchdog, on the
    /// current (control) runtime. `workers` are the connection workers' runtimes, each of
    /// which must answer before a watchdog ping.
    pub(crate) fn start(shared: &Arc<Shared>, workers: &[tokio::runtime::Handle]) -> Systemd {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut systemd = Systemd {
            enabled,
            shared: Arc::clone(shared),
            state: Arc::new(Mutex::new((Phase::Serving, String::new()))),
            tasks: Vec::new(),
        };
        if !enabled {
            return systemd;
        }
        // A zero timeout would make a zero ping interval; systemd never sets one.
        if let Some(timeout) = sd_notify::watchdog_enabled().filter(|t| !t.is_zero()) {
            tracing::info!(?timeout, "systemd watchdog enabled; pinging at half of it");
            let workers = workers.to_vec();
            systemd
                .tasks
                .push(tokio::spawn(watchdog(timeout / 2, workers)));
        }
        let (shared, state) = (Arc::clone(shared), Arc::clone(&systemd.state));
        systemd.tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(STATUS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                update_status(&shared, &state, None, &[]);
            }
        }));
        systemd
    }

    /// `READY=1`: every listener is bound and the eBPF side is attached (call it once they
    /// are), or a reload is over.
    pub(crate) fn ready(&self) {
        if self.enabled {
            update_status(
                &self.shared,
                &self.state,
                Some(Phase::Serving),
                &[NotifyState::Ready],
            );
        }
    }

    /// `MAINPID=` this process and `READY=1`, for a process that took the listeners over from
    /// the service's main process (see [`crate::upgrade`]): from now on systemd follows this
    /// one, and the old one's exit is no longer the service's. systemd hears it only with
    /// `NotifyAccess=all`, since this process is not the main one until the message is read,
    /// and only from a process in the service's cgroup (the old process started this one).
    pub(crate) fn ready_after_takeover(&self) {
        if self.enabled {
            update_status(
                &self.shared,
                &self.state,
                Some(Phase::Serving),
                &[NotifyState::MainPid(std::process::id()), NotifyState::Ready],
            );
        }
    }

    /// A new process has taken the listeners over: not `STOPPING=1` (the service goes on, in
    /// the new process), only a last status line; then nothing more, so that neither this
    /// process's status nor its watchdog pings stand for the new one's.
    pub(crate) fn handing_over(&mut self, to: i32) {
        if !self.enabled {
            return;
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let line = format!(
            "draining after upgrade: {} connections open here; PID {to} serves",
            self.shared.open_connections()
        );
        send(&[NotifyState::Status(&line)]);
        self.enabled = false;
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`, before re-reading the configuration; follow it
    /// with [`Systemd::ready`] whatever the reload's result.
    pub(crate) fn reloading(&self) {
        if !self.enabled {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => update_status(
                &self.shared,
                &self.state,
                Some(Phase::Reloading),
                &[NotifyState::Reloading, now],
            ),
            Err(e) => tracing::warn!("reading the monotonic clock for systemd: {e}"),
        }
    }

    /// `STOPPING=1`: no new connections from now on.
    pub(crate) fn stopping(&self) {
        if self.enabled {
            update_status(
                &self.shared,
                &self.state,
                Some(Phase::Stopping),
                &[NotifyState::Stopping],
            );
        }
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Recomputes the status line (in `phase`, if given) and sends it with `states` if either
/// the line changed or there are states to send.
fn update_status(
    shared: &Shared,
    state: &Mutex<(Phase, String)>,
    phase: Option<Phase>,
    states: &[NotifyState<'_>],
) {
    let mut guard = match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let (current, last) = &mut *guard;
    if let Some(phase) = phase {
        *current = phase;
    }
    let line = status_line(shared, *current);
    if line == *last && states.is_empty() {
        return;
    }
    let mut all = states.to_vec();
    all.push(NotifyState::Status(&line));
    send(&all);
    *last = line;
}

/// `serving: 12 connections open; forwarding auto, kernel path attached`.
fn status_line(shared: &Shared, phase: Phase) -> String {
    let phase = match phase {
        Phase::Serving => "serving",
        Phase::Reloading => "reloading",
        Phase::Stopping => "stopping",
    };
    let open = shared.open_connections();
    let forwarding = shared.current().config.defaults.forwarding;
    let kernel = if shared.kernel().is_some() {
        "kernel path attached"
    } else {
        "kernel path not loaded"
    };
    let plural = if open == 1 { "" } else { "s" };
    format!("{phase}: {open} connection{plural} open; forwarding {forwarding}, {kernel}")
}

/// Sends `WATCHDOG=1` every `every`, each time after every worker runtime ran a task.
async fn watchdog(every: Duration, workers: Vec<tokio::runtime::Handle>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut answered = true;
        for worker in &workers {
            // A worker that cannot run a trivial task within the interval is wedged.
            if tokio::time::timeout(every, worker.spawn(async {}))
                .await
                .map_or(true, |joined| joined.is_err())
            {
                answered = false;
            }
        }
        if answered {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("a connection worker did not answer; withholding the watchdog ping");
        }
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling systemd {states:?}: {e}");
    }
}
