//! `spliced generate-docs`: the man pages and shell completions, written from the same clap
//! definitions the binary parses its command line with, so they cannot drift from it.
//!
//! A hidden subcommand of the shipped binary rather than an xtask step: the command line is
//! defined in `main.rs`, and the packaging step (`cargo xtask deb`) runs the very binary it
//! packs, so every option added later appears in the man page without anyone copying it.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// Extra sections of `spliced(8)`, in roff: what clap does not know.
const EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Re-read the configuration file (and every file it includes). Sites, timeouts and the XDP deny
list change for new connections; established connections go on untouched. An invalid file is
refused and the running configuration kept.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, let open connections finish for the grace period (\fB\-\-grace\fR), then reset
the rest.
.TP
\fBSIGUSR2\fR
Upgrade in place, as \fBspliced upgrade\fR does: start the binary again from the path it was
started with, with the same arguments and \fB\-\-upgrade\-from\fR the control socket; once that
process is ready it takes the listening sockets over, and this one drains and exits 0. If it
fails, this one logs why and serves on.
.SH SYSTEMD
Under a unit with \fBType=notify\fR, spliced sends \fBREADY=1\fR once every listener is bound and
the eBPF side is attached, \fBRELOADING=1\fR and \fBREADY=1\fR around a reload, \fBSTOPPING=1\fR,
a \fBSTATUS=\fR line with the open connections and the forwarding engine, and \fBWATCHDOG=1\fR
at half of \fBWatchdogSec=\fR. Without \fBNOTIFY_SOCKET\fR it sends nothing. In an upgrade
(\fBspliced upgrade\fR or SIGUSR2) the new process sends \fBMAINPID=\fR with its own PID and
\fBREADY=1\fR (the unit has \fBNotifyAccess=all\fR), and the old one sends no \fBSTOPPING=1\fR,
only a last status. Under systemd a takeover by a process outside the service's cgroup
(\fBspliced run \-\-upgrade\-from\fR started from a shell) is refused.
.SH FILES
.TP
\fI/etc/spliced/spliced.toml\fR
The configuration the packaged unit runs with.
.TP
\fI/etc/spliced/sites/\fR
One file per site, read through \fBinclude = ["sites/*.toml"]\fR in the main file.
.TP
\fI/sys/fs/bpf/spliced/\fR
The pinned eBPF maps, for \fBbpftool\fR(8); removed when spliced stops.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBbpftool\fR(8), \fBhaproxy\fR(1)
"#;

/// Writes `spliced.8` and one page per subcommand (`spliced-run.8`, ...) into `out/man8/`,
/// and the bash, zsh and fish completions into `out/completions/`. Returns the files written.
pub fn write(cmd: &clap::Command, out: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = public(cmd);
    cmd.build();
    let mut written = Vec::new();
    let man = out.join("man8");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut pages = vec![(cmd.clone(), true)];
    pages.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| (s.clone(), false)),
    );
    for (page, top) in pages {
        let page = clap_mangen::Man::new(page).section("8");
        let path = man.join(page.get_filename());
        let mut text = Vec::new();
        page.render(&mut text)?;
        if top {
            text.extend_from_slice(EXTRA.as_bytes());
        }
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&text))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, &name, &completions)
            .with_context(|| format!("writing the {shell} completions"))?;
        written.push(path);
    }
    Ok(written)
}

/// `cmd` as users see it: without hidden subcommands (this one) and without `help`, which
/// would otherwise get a page and completions of its own. clap cannot remove a subcommand, so
/// the top level (which has no arguments of its own) is rebuilt around the visible ones.
fn public(cmd: &clap::Command) -> clap::Command {
    let mut public = clap::Command::new(env!("CARGO_BIN_NAME"))
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true)
        .subcommand_required(true)
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = cmd.get_about() {
        public = public.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        public = public.long_about(about.clone());
    }
    public
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages and completions a user gets: every visible subcommand, the extra sections,
    /// and nothing of the hidden subcommand or of `help`.
    #[test]
    fn writes_pages_and_completions_without_hidden_commands() {
        let cmd = clap::Command::new("spliced")
            .about("an edge proxy")
            .subcommand(clap::Command::new("run").about("Run it"))
            .subcommand(clap::Command::new("check").about("Check it"))
            .subcommand(clap::Command::new("generate-docs").hide(true));
        let out = std::env::temp_dir().join(format!("spliced-docs-{}", std::process::id()));
        let files = write(&cmd, &out).expect("writes");
        let names: Vec<String> = files
            .iter()
            .filter_map(|f| Some(f.file_name()?.to_str()?.to_owned()))
            .collect();
        assert_eq!(
            names,
            [
                "spliced.8",
                "spliced-run.8",
                "spliced-check.8",
                "spliced.bash",
                "_spliced",
                "spliced.fish"
            ]
        );
        let top = std::fs::read_to_string(out.join("man8/spliced.8")).expect("page");
        assert!(
            top.contains("spliced\\-run(8)") && top.contains(".SH SIGNALS"),
            "{top}"
        );
        for file in &files {
            let text = std::fs::read_to_string(file).expect("file");
            // Roff escapes the hyphen.
            assert!(
                !text.contains("generate-docs") && !text.contains("generate\\-docs"),
                "{}",
                file.display()
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
