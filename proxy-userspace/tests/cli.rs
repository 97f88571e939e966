//! The `spliced` command as a user meets it: `--version`, `check` with good and bad files, `run`
//! refusing bad input, reloading on SIGHUP and stopping cleanly on SIGTERM. Everything here
//! stays on loopback.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_spliced");

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("spliced-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spliced(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run spliced")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_names_the_package_version() {
    let out = spliced(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("spliced {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_a_valid_config_and_summarises_it() {
    let dir = Scratch::new("check-ok");
    std::fs::create_dir_all(dir.0.join("sites")).expect("sites dir");
    dir.write(
        "sites/a.toml",
        "[[site]]\nhostnames = [\"a.example\", \"*.a.example\"]\nbackend = \"2001:db8::1\"\n",
    );
    dir.write("sites/b.toml", "[[site]]\nhostnames = [\"b.example\"]\nbackend = \"2001:db8::2\"\nproxy_protocol = \"v2\"\n");
    let cfg = dir.write(
        "spliced.toml",
        "include = [\"sites/*.toml\"]\n[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n",
    );
    let out = spliced(&["check", "--config", cfg.to_str().expect("utf-8 path")]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "check failed: {}{stdout}",
        text(&out.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("0.0.0.0:443"), "{stdout}");
    assert!(
        stdout.contains("a.toml") && stdout.contains("b.toml"),
        "{stdout}"
    );
}

/// Runs `spliced check` on a main file with one TLS listener that includes `sites/site.toml`
/// holding `site`; asserts it fails and returns its standard error.
fn check_included_site(tag: &str, site: &str) -> String {
    let dir = Scratch::new(tag);
    std::fs::create_dir_all(dir.0.join("sites")).expect("sites dir");
    dir.write("sites/site.toml", site);
    let cfg = dir.write(
        "spliced.toml",
        "include = [\"sites/*.toml\"]\n[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n",
    );
    let out = spliced(&["check", "--config", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    text(&out.stderr)
}

#[test]
fn check_names_file_line_and_problem_and_exits_non_zero() {
    let stderr = check_included_site(
        "check-bad",
        "[[site]]\nhostnames = [\"c.example\"]\nbackend = \"2001:db8::3\"\nproxy_protocol = \"v3\"\n",
    );
    assert!(
        stderr.contains("sites/site.toml:4:"),
        "no file:line in {stderr:?}"
    );
    assert!(
        stderr.contains("proxy_protocol"),
        "no problem named in {stderr:?}"
    );

    let missing = spliced(&["check", "--config", "/nonexistent/spliced.toml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("/nonexistent/spliced.toml"));
}

/// A header on a site only TLS reaches, in an included customer file, is explained with that
/// file's line (issue 14).
#[test]
fn check_explains_a_forwarded_header_no_http_listener_can_add() {
    let stderr = check_included_site(
        "check-header",
        "[[site]]\nhostnames = [\"shop.example\"]\nbackend = \"2001:db8::3\"\n\
         forwarded_header = \"x-forwarded-for\"\n",
    );
    assert!(
        stderr.contains("sites/site.toml:4:")
            && stderr.contains(
                "forwarded_header = \"x-forwarded-for\" needs a [[listen]] with protocol = \"http\""
            ),
        "{stderr:?}"
    );
}

#[test]
fn run_refuses_an_invalid_config_and_a_busy_port() {
    let dir = Scratch::new("run-bad");
    let cfg = dir.write(
        "bad.toml",
        "[[listen]]\naddress = \"nowhere\"\nprotocol = \"tls\"\n",
    );
    let out = spliced(&[
        "run",
        "--config",
        cfg.to_str().expect("utf-8 path"),
        "--pin-dir",
        "none",
        "--control-socket",
        "none",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad.toml:2:"),
        "{}",
        text(&out.stderr)
    );

    // Held without SO_REUSEPORT, so spliced cannot share it.
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let cfg = dir.write(
        "busy.toml",
        &format!("[[listen]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n"),
    );
    let out = spliced(&[
        "run",
        "--config",
        cfg.to_str().expect("utf-8 path"),
        "--pin-dir",
        "none",
        "--control-socket",
        "none",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("127.0.0.1:{port}")),
        "{}",
        text(&out.stderr)
    );
}

/// A running `spliced run`, killed by PID if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a stopped `spliced run` left: its exit status, standard output and standard error.
struct Stopped {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Running {
    /// Starts `spliced run --config cfg` with `extra` arguments, standard output and standard
    /// error piped (for [`Running::stop`] to collect).
    fn start(cfg: &std::path::Path, extra: &[&str]) -> Running {
        // No pins and no control socket: tests run at once, and a second spliced refuses a pin
        // directory or a control socket another one holds.
        let child = Command::new(BIN)
            .args(["run", "--config", cfg.to_str().expect("utf-8 path")])
            .args(["--pin-dir", "none", "--control-socket", "none"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start spliced");
        Running(child)
    }

    /// Sends SIGTERM, waits up to 15 s for the exit, and collects the piped output.
    fn stop(&mut self) -> Stopped {
        signal(&self.0, "TERM");
        let child = &mut self.0;
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Stopped {
            status,
            stdout: read_all(child.stdout.take()),
            stderr: read_all(child.stderr.take()),
        }
    }
}

/// Everything left in a child's pipe; empty if it was not piped.
fn read_all(pipe: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_string(&mut text);
    }
    text
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("spliced never listened on {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends one HTTP request for `host` through the proxy and returns everything it got back.
fn request(addr: SocketAddr, host: &str) -> String {
    let mut s = wait_connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    text(&reply)
}

fn config(port: u16, backend: u16, with_site: bool) -> String {
    let mut c = format!("[[listen]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n");
    if with_site {
        c.push_str(&format!(
            "[[site]]\nhostnames = [\"a.example\"]\nbackend = \"[::1]:{backend}\"\n"
        ));
    }
    c
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn sighup_reloads_sites_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let dir = Scratch::new("reload");
    // A one-shot-per-connection backend on IPv6 loopback that answers with a fixed response.
    let backend = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("backend");
    let backend_port = backend.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in backend.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nbackend",
            );
        }
    });
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = dir.write("spliced.toml", &config(port, backend_port, false));
    let mut running = Running::start(&cfg, &[]);

    let before = request(addr, "a.example");
    assert!(
        before.starts_with("HTTP/1.1 421"),
        "unknown site should get 421, got {before:?}"
    );

    dir.write("spliced.toml", &config(port, backend_port, true));
    signal(&running.0, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = String::new();
    while Instant::now() < deadline {
        after = request(addr, "a.example");
        if after.ends_with("backend") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        after.starts_with("HTTP/1.1 200") && after.ends_with("backend"),
        "after reload: {after:?}"
    );

    dir.write("spliced.toml", "this is not toml");
    signal(&running.0, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    let still = request(addr, "a.example");
    assert!(
        still.ends_with("backend"),
        "a bad reload must keep the running config: {still:?}"
    );

    let Stopped {
        status,
        stdout,
        stderr,
    } = running.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert!(
        stderr.contains("reload refused") && stderr.contains("spliced.toml:1:"),
        "{stderr}"
    );
    assert!(
        stdout.lines().any(|l| l.contains("outcome=unknown_name")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .filter(|l| l.contains("site=a.example") && l.contains("outcome=ok"))
            .count()
            >= 2,
        "{stdout}"
    );
}

/// A site that sends the PROXY v2 unique id gets the same id in the access log (`id=`), so the
/// backend's log line and ours can be joined; the line is there after SIGTERM.
#[test]
fn access_log_names_the_unique_id_the_backend_received() {
    let dir = Scratch::new("unique-id");
    let backend = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("backend");
    let backend_port = backend.local_addr().expect("addr").port();
    let (received, preface) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Some(Ok(mut s)) = backend.incoming().next() else {
            return;
        };
        let mut got = Vec::new();
        let mut chunk = [0u8; 2048];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nbackend");
        let _ = received.send(got);
    });
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = dir.write(
        "spliced.toml",
        &format!(
            "{}proxy_protocol = \"v2\"\nproxy_protocol_tlvs = [\"unique_id\"]\n",
            config(port, backend_port, true)
        ),
    );
    let mut running = Running::start(&cfg, &[]);
    let reply = request(addr, "a.example");
    assert!(reply.ends_with("backend"), "{reply:?}");
    let preface = preface
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend got a request");
    // IPv4 on both ends: 16 fixed bytes and 12 of addresses, then the only TLV asked for:
    // PP2_TYPE_UNIQUE_ID (0x05), 32 bytes.
    let tlv = preface.get(28..63).expect("a v2 header with one TLV");
    assert_eq!(tlv[..3], [0x05, 0x00, 0x20], "{preface:02x?}");
    let id = text(&tlv[3..]);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    let stopped = running.stop();
    let line = stopped
        .stdout
        .lines()
        .find(|l| l.contains("site=a.example"))
        .unwrap_or_else(|| panic!("no access-log line in {:?}", stopped.stdout));
    assert!(line.contains(&format!(" id={id}")), "{line}");
}

#[test]
fn ipv4_and_ipv6_listeners_share_a_port() {
    let dir = Scratch::new("dual");
    let backend = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("backend");
    let backend_port = backend.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in backend.incoming().take(2) {
            let Ok(mut s) = stream else { continue };
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let port = free_port();
    let cfg = dir.write(
        "spliced.toml",
        &format!(
            "[[listen]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n\
             [[listen]]\naddress = \"[::1]:{port}\"\nprotocol = \"http\"\n\
             [[site]]\nhostnames = [\"a.example\"]\nbackend = \"[::1]:{backend_port}\"\n"
        ),
    );
    let child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().expect("utf-8 path")])
        .args(["--pin-dir", "none", "--control-socket", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start spliced");
    let _running = Running(child);
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ] {
        let reply = request(addr, "A.Example.");
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok"),
            "via {addr}: {reply:?}"
        );
    }
}

#[test]
fn metrics_count_outcomes_and_kernel_bytes() {
    let dir = Scratch::new("metrics");
    let backend = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("backend");
    let backend_port = backend.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in backend.incoming().take(1) {
            let Ok(mut s) = stream else { continue };
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head);
            // Answer only after a pause: a backend that has already closed by the time the
            // sockets would enter the map makes the connection fall back to splice, and this
            // test wants the kernel path.
            std::thread::sleep(Duration::from_millis(200));
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let port = free_port();
    let metrics_port = free_port();
    // As root, ask for the sockmap engine so the kernel counters have something to count.
    let engine = if nix::unistd::Uid::effective().is_root() {
        "sockmap"
    } else {
        "splice"
    };
    let cfg = dir.write(
        "spliced.toml",
        &format!(
            "[defaults]\nforwarding = \"{engine}\"\nsockmap_handoff = 0\n{}",
            config(port, backend_port, true)
        ),
    );
    let child = Command::new(BIN)
        .args([
            "run",
            "--config",
            cfg.to_str().expect("utf-8 path"),
            "--pin-dir",
            "none",
        ])
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start spliced");
    let _running = Running(child);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(request(addr, "a.example").ends_with("ok"));
    assert!(request(addr, "nobody.example").starts_with("HTTP/1.1 421"));
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The access log and counters are written when a connection ends; allow a moment.
    while Instant::now() < deadline {
        let mut s = wait_connect(metrics_addr);
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        text = String::from_utf8_lossy(&reply).into_owned();
        if text.contains("spliced_connections_total{outcome=\"ok\"} 1")
            && text.contains("spliced_connections_total{outcome=\"unknown_name\"} 1")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("spliced_connections_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("spliced_connections_total{outcome=\"unknown_name\"} 1"),
        "{text}"
    );
    // As root the sockmap engine is used, and its kernel counters are exported.
    if nix::unistd::Uid::effective().is_root() {
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("spliced_kernel_total{counter=\"redirected_bytes\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        assert!(bytes.is_some_and(|b| b > 0), "no spliced bytes in:\n{text}");
    }
}

/// Runs `spliced ARGS` as an unprivileged user when this test runs as root (the status of a
/// running instance needs no privilege), else as ourselves.
fn spliced_unprivileged(args: &[&str]) -> Output {
    let root = nix::unistd::Uid::effective().is_root();
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    cmd.args(args).output().expect("run spliced")
}

/// A spliced serving `cfg` (splice engine: nothing to load) with metrics on a free port;
/// returns it and the metrics address.
fn run_with_metrics(cfg: &std::path::Path) -> (Running, SocketAddr) {
    let metrics_port = free_port();
    let running = Running::start(cfg, &["--metrics", &format!("127.0.0.1:{metrics_port}")]);
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    drop(wait_connect(metrics));
    (running, metrics)
}

/// `spliced status` against a running instance, as an unprivileged user, prints its listeners,
/// sites, connections by engine, outcomes and kernel and XDP state; with nothing running it
/// says so on standard error and exits non-zero.
#[test]
fn status_prints_a_running_instance_and_fails_when_none_answers() {
    let dir = Scratch::new("status");
    let port = free_port();
    let cfg = dir.write(
        "spliced.toml",
        &format!(
            "[defaults]\nforwarding = \"splice\"\n{}",
            config(port, 9, true)
        ),
    );
    let (mut running, metrics) = run_with_metrics(&cfg);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(request(addr, "nobody.example").starts_with("HTTP/1.1 421"));
    let metrics_arg = metrics.to_string();
    let args = ["status", "--metrics", metrics_arg.as_str()];
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = spliced_unprivileged(&args);
        if text(&out.stdout).contains("unknown_name 1") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    let version = env!("CARGO_PKG_VERSION");
    for line in [
        format!("spliced {version}, metrics at http://{metrics}/metrics\n"),
        format!("listeners: 127.0.0.1:{port} (http)\n"),
        "sites: 1 (1 hostnames); default site: none (unknown names are refused)\n".to_owned(),
        "connections: 0 open; forwarding, by engine: sockmap 0, splice 0, copy 0, http 0, \
         packet 0; ended, by engine: sockmap 0, splice 0, copy 0, http 0, packet 0\n"
            .to_owned(),
        "outcomes: unknown_name 1\n".to_owned(),
        "kernel (sockmap): not loaded\n".to_owned(),
        "xdp: not attached\n".to_owned(),
    ] {
        assert!(report.contains(&line), "{line:?} not in:\n{report}");
    }
    let stopped = running.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let out = spliced_unprivileged(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let error = text(&out.stderr);
    assert!(
        error.starts_with(&format!(
            "spliced status: nothing answers at http://{metrics}/metrics (is spliced running \
             with --metrics {metrics}?): "
        )),
        "{error}"
    );
}

/// `spliced check --against ADDR` prints what reloading the file would change compared with
/// what the running instance serves (a site removed, one added, one's backend changed), the
/// same as `--previous` with the running file; after the reload there is nothing left to
/// change. With nothing running, it says it cannot compare and exits non-zero.
#[test]
fn check_against_a_running_instance_prints_what_a_reload_would_change() {
    let dir = Scratch::new("check-against");
    let port = free_port();
    let listen = format!(
        "[defaults]\nforwarding = \"splice\"\n[[listen]]\naddress = \"127.0.0.1:{port}\"\n\
         protocol = \"http\"\n"
    );
    let site = |name: &str, backend: &str| {
        format!("[[site]]\nhostnames = [\"{name}\"]\nbackend = \"{backend}\"\n")
    };
    let old = format!(
        "{listen}{}{}",
        site("a.example", "[::1]:8080"),
        site("b.example", "[::1]:8081")
    );
    let new = format!(
        "{listen}{}{}",
        site("a.example", "[::1]:9090"),
        site("c.example", "[::1]:8082")
    );
    let cfg = dir.write("spliced.toml", &old);
    let previous = dir.write("previous.toml", &old);
    let (running, metrics) = run_with_metrics(&cfg);
    let next = dir.write("next.toml", &new);
    let next_arg = next.to_str().expect("utf-8 path");
    let metrics_arg = metrics.to_string();
    let against = spliced(&["check", "--config", next_arg, "--against", &metrics_arg]);
    assert!(against.status.success(), "{}", text(&against.stderr));
    let expected = "~ site a.example:\n    backend: [::1]:8080 -> [::1]:9090\n\
                    - site b.example: hostnames=b.example backend=[::1]:8081 proxy_protocol=none \
                    proxy_protocol_tlvs= forwarding=- forwarded_header=none\n\
                    + site c.example: hostnames=c.example backend=[::1]:8082 proxy_protocol=none \
                    proxy_protocol_tlvs= forwarding=- forwarded_header=none\n\
                    1 added, 1 removed, 1 changed; sites: 2 -> 2\n";
    let report = text(&against.stdout);
    assert!(
        report.contains(&format!(
            "changes from the running spliced at {metrics}:\n{expected}"
        )),
        "{report}"
    );
    let from_file = spliced(&[
        "check",
        "--config",
        next_arg,
        "--previous",
        previous.to_str().expect("utf-8 path"),
    ]);
    assert!(
        text(&from_file.stdout)
            .contains(&format!("changes from {}:\n{expected}", previous.display())),
        "{}",
        text(&from_file.stdout)
    );
    // Reloaded: the running configuration is the new one.
    std::fs::write(&cfg, &new).expect("rewrite the config");
    signal(&running.0, "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = spliced(&["check", "--config", next_arg, "--against", &metrics_arg]);
        if text(&out.stdout).ends_with("\nno changes\n\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still changes after the reload:\n{}",
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(running);
    let nothing = spliced(&["check", "--config", next_arg, "--against", &metrics_arg]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        text(&nothing.stderr).contains(&format!(
            "spliced check: cannot compare: nothing answers at http://{metrics}/config"
        )),
        "{}",
        text(&nothing.stderr)
    );
}
