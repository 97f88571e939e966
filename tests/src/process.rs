//! Processes a test starts, stopped by PID when dropped.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A process this test started; its stdout and stderr go to files in the world's directory.
pub struct Service {
    name: String,
    child: Option<Child>,
    /// Where its standard output goes.
    pub stdout: PathBuf,
    /// Where its standard error goes.
    pub stderr: PathBuf,
    stop_signal: Signal,
}

impl Service {
    /// Starts `cmd` with output captured under `dir` as `<name>.out` / `<name>.err`.
    pub fn start(name: &str, mut cmd: Command, dir: &std::path::Path) -> Result<Service> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Service {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
            stop_signal: Signal::SIGTERM,
        })
    }

    /// Which signal stops it gracefully (SIGTERM unless changed; nginx wants SIGQUIT to finish
    /// writing its logs).
    pub fn stop_with(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    /// The PID of the process we started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has already exited, with what it printed.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited early ({status}): {}",
                self.name,
                std::fs::read_to_string(&self.stderr)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Ok(())
    }

    /// Sends `signal`, waits up to `grace` for exit, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was already stopped", self.name);
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Ok(child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it with its graceful signal (see [`Service::stop_with`]), SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.stop(self.stop_signal, grace)
    }

    /// What it wrote to standard error so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What it wrote to standard output so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(self.stop_signal, Duration::from_secs(5));
        }
    }
}

/// Polls `check` every 20 ms until it returns `Ok(true)` or `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's open descriptors, as `/proc/<pid>/fd` lists them.
pub struct OpenFiles {
    /// Everything that is not a pipe end: sockets, files, epoll and event descriptors.
    pub other: usize,
    /// Pipe ends.
    pub pipe_ends: usize,
    /// `pipe:[inode]` of every pipe with an end open (two ends of one pipe count once).
    pub pipes: BTreeSet<String>,
}

/// Lists `pid`'s open descriptors. One closed between the listing and the look at it is not
/// counted.
pub fn open_files(pid: u32) -> Result<OpenFiles> {
    let mut files = OpenFiles {
        other: 0,
        pipe_ends: 0,
        pipes: BTreeSet::new(),
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with("pipe:") {
            files.pipe_ends += 1;
            files.pipes.insert(target);
        } else {
            files.other += 1;
        }
    }
    Ok(files)
}
