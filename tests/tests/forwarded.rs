//! Header sites (`forwarded_header`): real nginx and Apache learn the client's IPv4 address from
//! `X-Forwarded-For` on every request of a keep-alive connection; a small HTTP backend written
//! here records every request head it gets, sums up bodies, and echoes after an upgrade, so the
//! tests can check what went through byte for byte: pipelining, a 100 MiB chunked upload, a
//! protocol switch, every smuggling case, and a client's own `X-Forwarded-For`.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test forwarded`.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, CLIENT_V4_B, Ns, PROXY_V6, World,
    backends::{self, NginxServer, RemoteIp},
    raw::{self, End, XorShift},
    spliced::{Launch, Spliced, field},
    wait_for,
};

/// Where the test backend listens.
const APP_PORT: u16 = 9000;

/// Read and write timeout of the test's own sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn config() -> String {
    format!(
        r#"
[defaults]
forwarded_header = "x-forwarded-for"
trusted_proxies = ["{CLIENT_V4_B}/32"]

[[listen]]
address = "0.0.0.0:80"
protocol = "http"

[[site]]
hostnames = ["nginx.example"]
backend = {{ http = "[{BACKEND_V6}]:8080" }}

[[site]]
hostnames = ["apache.example"]
backend = {{ http = "[{BACKEND_V6}]:8081" }}

[[site]]
hostnames = ["app.example"]
backend = {{ http = "[{BACKEND_V6}]:{APP_PORT}" }}

[[site]]
hostnames = ["other.example"]
backend = {{ http = "[{BACKEND_V6}]:{APP_PORT}" }}

[[site]]
hostnames = ["forwarded.example"]
backend = {{ http = "[{BACKEND_V6}]:{APP_PORT}" }}
forwarded_header = "forwarded"
proxy_protocol = "v1"

[[site]]
hostnames = ["untouched.example"]
backend = {{ http = "[{BACKEND_V6}]:{APP_PORT}" }}
forwarded_header = "none"
"#
    )
}

/// A tiny HTTP/1.1 server in the backend namespace. It records each request head (and a PROXY
/// line, if one comes first), answers `len=N hash=H` for the body it read (chunked or
/// Content-Length; `100 Continue` when asked), and after a request with `Upgrade` (or a
/// `CONNECT`) switches and echoes every byte until the client's end of stream. `/204` and
/// `/304` get bodiless responses (the 304 with a Content-Length), `/slow` waits 300 ms.
struct App {
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl App {
    fn start(world: &World) -> Result<App> {
        let listener = raw::listen_in(world, Ns::Backend, SocketAddr::new(BACKEND_V6, APP_PORT))?;
        listener.set_nonblocking(true)?;
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (heads, stop) = (heads.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(&listener, &heads, &stop))
        };
        Ok(App {
            heads,
            stop,
            thread: Some(thread),
        })
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, heads: &Arc<Mutex<Vec<String>>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let heads = heads.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &heads);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// FNV-1a, 64 bits: a checksum both ends compute the same way as bytes stream by.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn serve(stream: TcpStream, heads: &Mutex<Vec<String>>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line.starts_with("PROXY ") && head.is_empty() {
                heads
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(line);
                continue;
            }
            let end = line == "\r\n";
            head.push_str(&line);
            if end {
                break;
            }
        }
        heads
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(head.clone());
        let method = head.split(' ').next().unwrap_or_default().to_string();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let tunnel: Option<&[u8]> = if method == "CONNECT" {
            Some(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        } else if header("upgrade").is_some() {
            Some(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
            )
        } else {
            None
        };
        if let Some(answer) = tunnel {
            out.write_all(answer)?;
            std::io::copy(&mut reader, &mut out)?;
            out.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut hash = Fnv::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut take = |reader: &mut BufReader<TcpStream>, mut n: u64| -> Result<()> {
            while n > 0 {
                let want = usize::try_from(n.min(buf.len() as u64))?;
                reader.read_exact(&mut buf[..want])?;
                hash.update(&buf[..want]);
                len += want as u64;
                n -= want as u64;
            }
            Ok(())
        };
        if header("transfer-encoding").is_some() {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size)?;
                let size = u64::from_str_radix(size.trim_end(), 16)
                    .with_context(|| format!("chunk size {size:?}"))?;
                if size == 0 {
                    let mut trailer = String::new();
                    while reader.read_line(&mut trailer)? > 0 && trailer != "\r\n" {
                        trailer.clear();
                    }
                    break;
                }
                take(&mut reader, size)?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = header("content-length") {
            take(&mut reader, n.parse()?)?;
        }
        let path = head.split(' ').nth(1).unwrap_or_default();
        match path {
            // Responses without a body whatever their headers say (RFC 9112 §6.3).
            "/204" => {
                out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
                continue;
            }
            "/304" => {
                out.write_all(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")?;
                continue;
            }
            "/slow" => std::thread::sleep(Duration::from_millis(300)),
            _ => {}
        }
        let body = format!("len={len} hash={:016x}\n", hash.0);
        let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        out.write_all(response.as_bytes())?;
        if method != "HEAD" {
            out.write_all(body.as_bytes())?;
        }
    }
}

/// One response as a client reads it: the status, the head, the body.
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response framed by Content-Length (no body for `HEAD` or a 1xx).
fn read_response(reader: &mut BufReader<TcpStream>, head_request: bool) -> Result<Response> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("end of stream in a response head after {head:?}");
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status: u16 = head
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()
        .with_context(|| format!("status in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![
        0u8;
        if head_request || status < 200 {
            0
        } else {
            length
        }
    ];
    reader.read_exact(&mut body)?;
    Ok(Response { status, head, body })
}

/// A client connection to the proxy's port 80, with a reader on the same socket.
fn client(world: &World) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = raw::connect(world, 80, IO_TIMEOUT)?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

fn start(world: &World) -> Result<Spliced> {
    Launch::new(config()).metrics().start(world, &[80])
}

/// A world with the test backend and spliced (dropped in reverse: spliced, backend, world).
fn app_world() -> Result<(World, App, Spliced)> {
    let world = World::new()?;
    let app = App::start(&world)?;
    let spliced = start(&world)?;
    Ok((world, app, spliced))
}

/// Waits for the access-log line of the connection from `me` and checks its fields.
fn expect_log(spliced: &Spliced, me: SocketAddr, fields: &[(&str, &str)]) -> Result<String> {
    let line = spliced.log_line_for(me, Duration::from_secs(10))?;
    for (key, value) in fields {
        ensure!(
            field(&line, key) == Some(value),
            "{key}={value} not in {line:?}"
        );
    }
    Ok(line)
}

#[test]
fn nginx_and_apache_see_the_client_on_every_request() -> Result<()> {
    let world = World::new()?;
    let _nginx = backends::nginx(
        &world,
        &[NginxServer {
            port: 8080,
            tls: None,
            proxy_protocol: false,
            real_ip_from: Some(PROXY_V6),
            body: "nginx-xff",
        }],
    )?;
    let _apache = backends::apache_with(
        &world,
        8081,
        None,
        "apache-xff",
        RemoteIp::ForwardedFor(PROXY_V6),
    )?;
    let spliced = start(&world)?;
    for (host, body, log) in [
        (
            "nginx.example",
            "nginx-xff",
            backends::nginx_log(&world, 8080),
        ),
        ("apache.example", "apache-xff", backends::apache_log(&world)),
    ] {
        // Ten requests on one keep-alive connection, each with a client's own header to drop.
        let mut cmd = backends::curl_command(&world, CLIENT_V4, host, 80);
        for n in 1..=10 {
            if n > 1 {
                cmd.arg("--next");
            }
            cmd.args(["-H", "X-Forwarded-For: 6.6.6.6"]);
            cmd.arg(format!("http://{host}/?n={n}"));
        }
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.matches(body).count() == 10,
            "{host}: curl {}, output {text:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for n in [1, 2, 10] {
            let request = format!("\"GET /?n={n} HTTP/1.1\" 200");
            let text = backends::wait_log(&log, &request)?;
            let line = text
                .lines()
                .find(|l| l.contains(&request))
                .context("logged line")?;
            ensure!(
                line.starts_with(&format!("{CLIENT_V4}:")),
                "{host} logged request {n} from someone else: {line:?}"
            );
        }
        let all = std::fs::read_to_string(&log)?;
        ensure!(
            !all.contains("6.6.6.6"),
            "a client's own header won:\n{all}"
        );
        // One connection carried all ten (its line is written once the backend closed too).
        wait_for(
            &format!("a connection with requests=10 for {host}"),
            Duration::from_secs(10),
            || {
                Ok(spliced
                    .stdout_text()
                    .lines()
                    .any(|l| field(l, "site") == Some(host) && field(l, "requests") == Some("10")))
            },
        )
        .with_context(|| spliced.stdout_text())?;
    }
    Ok(())
}

#[test]
fn pipelined_requests_each_get_the_header_and_a_clients_own_is_dropped() -> Result<()> {
    let (world, app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    let requests = b"GET /1 HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n\
POST /2 HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\r\nhello\
POST /3 HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
HEAD /4 HTTP/1.1\r\nHost: app.example\r\nForwarded: for=6.6.6.6\r\n\r\n\
GET /5 HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-Proto: https\r\n\r\n";
    stream.write_all(requests)?;
    let mut hello = Fnv::new();
    hello.update(b"hello");
    let expected = [
        "len=0 hash=cbf29ce484222325\n".to_string(),
        format!("len=5 hash={:016x}\n", hello.0),
        format!("len=5 hash={:016x}\n", hello.0),
        String::new(),
        "len=0 hash=cbf29ce484222325\n".to_string(),
    ];
    for (i, want) in expected.iter().enumerate() {
        let response = read_response(&mut reader, i == 3)?;
        ensure!(
            response.status == 200 && response.body == want.as_bytes(),
            "response {}: {} {:?}",
            i + 1,
            response.head,
            String::from_utf8_lossy(&response.body)
        );
    }
    raw::shut_and_expect_eof(&mut stream, "after five responses")?;
    expect_log(
        &spliced,
        me,
        &[("engine", "http"), ("requests", "5"), ("outcome", "ok")],
    )?;
    let heads = app.heads();
    ensure!(heads.len() == 5, "the backend got {heads:#?}");
    let port = me.port();
    for head in &heads {
        ensure!(
            head.contains(&format!(
                "X-Forwarded-For: {CLIENT_V4}\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n\r\n"
            )) && !head.contains("6.6.6.6")
                && !head.contains("https"),
            "head from {port}: {head:?}"
        );
    }
    Ok(())
}

/// A load balancer in `trusted_proxies` keeps its headers; our address is appended.
#[test]
fn a_trusted_proxys_headers_are_appended_to() -> Result<()> {
    let (world, app, _spliced) = app_world()?;
    let mut cmd = backends::curl_command(&world, CLIENT_V4_B, "app.example", 80);
    cmd.args([
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-H",
        "X-Forwarded-Proto: https",
    ])
    .arg("http://app.example/lb");
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let heads = app.heads();
    let lb = heads
        .iter()
        .find(|h| h.starts_with("GET /lb "))
        .context("no request from the load balancer")?;
    ensure!(
        lb.contains("X-Forwarded-Proto: https\r\n")
            && lb.contains(&format!("X-Forwarded-For: 203.0.113.9, {CLIENT_V4_B}\r\n"))
            && !lb.contains("X-Forwarded-Proto: http\r\n"),
        "{lb:?}"
    );
    Ok(())
}

#[test]
fn forwarded_syntax_with_a_proxy_header_and_untouched_sites() -> Result<()> {
    let (world, app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    stream.write_all(
        b"GET / HTTP/1.1\r\nHost: forwarded.example\r\nForwarded: for=6.6.6.6\r\n\r\n",
    )?;
    ensure!(read_response(&mut reader, false)?.status == 200);
    raw::shut_and_expect_eof(&mut stream, "forwarded.example")?;
    let line = expect_log(&spliced, me, &[("engine", "http"), ("proxy", "v1")])?;
    let (mut plain, mut plain_reader) = client(&world)?;
    let plain_me = plain.local_addr()?;
    plain.write_all(
        b"GET / HTTP/1.1\r\nHost: untouched.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )?;
    ensure!(read_response(&mut plain_reader, false)?.status == 200);
    raw::shut_and_expect_eof(&mut plain, "untouched.example")?;
    // A site without a header keeps the splicing engine and the client's bytes as they are.
    expect_log(&spliced, plain_me, &[("engine", "splice")])?;
    let heads = app.heads();
    ensure!(heads.len() == 3, "the backend got {heads:#?}");
    ensure!(
        heads[0] == format!("PROXY TCP4 {CLIENT_V4} 192.0.2.1 {} 80\r\n", me.port()),
        "no PROXY line first: {heads:#?}"
    );
    ensure!(
        heads[1]
            == format!(
                "GET / HTTP/1.1\r\nHost: forwarded.example\r\nForwarded: for=\"{me}\";proto=http\r\n\
                 X-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n\r\n"
            ),
        "{:?}",
        heads[1]
    );
    // up= counts the request as sent on, without the PROXY header.
    ensure!(
        field(&line, "up") == Some(heads[1].len().to_string().as_str()),
        "{line}"
    );
    ensure!(
        heads[2] == "GET / HTTP/1.1\r\nHost: untouched.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
        "{:?}",
        heads[2]
    );
    Ok(())
}

#[test]
fn chunked_upload_of_100_mib_with_checksums() -> Result<()> {
    const TOTAL: usize = 100 << 20;
    let (world, _app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    stream.write_all(
        b"PUT /upload HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\
Expect: 100-continue\r\n\r\n",
    )?;
    let interim = read_response(&mut reader, false)?;
    ensure!(
        interim.status == 100,
        "expected 100 Continue: {}",
        interim.head
    );
    let mut rng = XorShift::new(14);
    let mut hash = Fnv::new();
    let mut data = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < TOTAL {
        // Chunk sizes from 1 byte to 256 KiB, so sizes and data cross reads everywhere.
        let size = usize::try_from(rng.next_u64() % (256 * 1024))? + 1;
        let size = size.min(TOTAL - sent);
        rng.fill(&mut data[..size]);
        hash.update(&data[..size]);
        stream.write_all(format!("{size:x}\r\n").as_bytes())?;
        stream.write_all(&data[..size])?;
        stream.write_all(b"\r\n")?;
        sent += size;
    }
    stream.write_all(b"0\r\nX-Checksum: fnv\r\n\r\n")?;
    let response = read_response(&mut reader, false)?;
    let want = format!("len={TOTAL} hash={:016x}\n", hash.0);
    ensure!(
        response.status == 200 && response.body == want.as_bytes(),
        "{} {:?}, want {want:?}",
        response.head,
        String::from_utf8_lossy(&response.body)
    );
    raw::shut_and_expect_eof(&mut stream, "after the upload")?;
    expect_log(&spliced, me, &[("requests", "1"), ("outcome", "ok")])?;
    Ok(())
}

#[test]
fn upgrade_turns_the_connection_into_a_byte_stream() -> Result<()> {
    let (world, _app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    // The first frame comes in the same write as the request, before the 101.
    stream.write_all(
        b"GET /chat HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n\
early bytes;",
    )?;
    let switched = read_response(&mut reader, false)?;
    ensure!(switched.status == 101, "{}", switched.head);
    echo_through(stream, reader)?;
    expect_log(
        &spliced,
        me,
        &[("engine", "http"), ("requests", "1"), ("outcome", "ok")],
    )?;
    Ok(())
}

#[test]
fn connect_turns_the_connection_into_a_byte_stream() -> Result<()> {
    let (world, _app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    stream.write_all(
        b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\nearly bytes;",
    )?;
    let established = read_response(&mut reader, false)?;
    ensure!(established.status == 200, "{}", established.head);
    echo_through(stream, reader)?;
    expect_log(
        &spliced,
        me,
        &[("engine", "http"), ("requests", "1"), ("outcome", "ok")],
    )?;
    Ok(())
}

/// After a switch: 1 MiB (starting with what looks like a request for another site) goes
/// through the echo and back unchanged, after the `early bytes;` sent with the request.
fn echo_through(stream: TcpStream, mut reader: BufReader<TcpStream>) -> Result<()> {
    let mut payload = vec![0u8; 1 << 20];
    XorShift::new(101).fill(&mut payload);
    // Bytes that look like HTTP are just bytes now.
    let lookalike = b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n";
    payload[..lookalike.len()].copy_from_slice(lookalike);
    let writer = {
        let mut stream = stream.try_clone()?;
        let payload = payload.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            stream.write_all(&payload)?;
            stream.shutdown(Shutdown::Write)
        })
    };
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let mut want = b"early bytes;".to_vec();
    want.extend_from_slice(&payload);
    ensure!(
        echoed == want,
        "echo differs: {} bytes back, {} sent",
        echoed.len(),
        want.len()
    );
    Ok(())
}

/// Sends `bytes` on a new connection, half-closes, and reads everything back.
fn exchange(world: &World, bytes: &[u8]) -> Result<(Vec<u8>, End, SocketAddr)> {
    let mut stream = raw::connect(world, 80, IO_TIMEOUT)?;
    let me = stream.local_addr()?;
    stream.write_all(bytes)?;
    stream.shutdown(Shutdown::Write)?;
    let (got, end) = raw::read_to_end(&mut stream, 1 << 20);
    Ok((got, end, me))
}

#[test]
fn smuggling_and_bad_input_are_refused_and_counted() -> Result<()> {
    let (world, app, spliced) = app_world()?;
    let long = format!(
        "GET /long HTTP/1.1\r\nHost: app.example\r\nX-Long: {}\r\n\r\n",
        "x".repeat(17 * 1024)
    );
    let cases: [(&str, &[u8], &str); 10] = [
        (
            "cl-te",
            b"POST /cl-te HTTP/1.1\r\nHost: app.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "content_length_and_transfer_encoding",
        ),
        (
            "cl-cl",
            b"POST /cl-cl HTTP/1.1\r\nHost: app.example\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            "conflicting_content_length",
        ),
        (
            "te-gzip",
            b"POST /te-gzip HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            "bad_transfer_encoding",
        ),
        (
            "te-chunked-twice",
            b"POST /te-twice HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "bad_transfer_encoding",
        ),
        (
            "fold",
            b"GET /fold HTTP/1.1\r\nHost: app.example\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
            "obs_fold",
        ),
        (
            "bare-lf",
            b"GET /bare-lf HTTP/1.1\nHost: app.example\r\n\r\n",
            "bare_line_ending",
        ),
        (
            "bare-cr",
            b"GET /bare-cr HTTP/1.1\r\nHost: app.example\rX: y\r\n\r\n",
            "bare_line_ending",
        ),
        (
            "nul",
            b"GET /nul HTTP/1.1\r\nHost: app.example\r\nX: a\x00b\r\n\r\n",
            "nul_in_head",
        ),
        ("long", long.as_bytes(), "head_too_large"),
        (
            "chunk",
            b"POST /chunk HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            "invalid_chunk",
        ),
    ];
    for (name, bytes, outcome) in cases {
        // Alone, and as the second request after a good one (whose response still arrives).
        for second in [false, true] {
            let mut input = Vec::new();
            if second {
                input.extend_from_slice(b"GET /first HTTP/1.1\r\nHost: app.example\r\n\r\n");
            }
            input.extend_from_slice(bytes);
            let (got, end, me) = exchange(&world, &input)?;
            let text = String::from_utf8_lossy(&got);
            let status = if outcome == "head_too_large" {
                431
            } else {
                400
            };
            let refusal = format!("HTTP/1.1 {status} ");
            let ok = if second {
                text.starts_with("HTTP/1.1 200 OK\r\n")
                    && text.contains(&refusal)
                    && text.matches("HTTP/1.1").count() == 2
            } else {
                text.starts_with(&refusal)
            };
            ensure!(
                ok && end.closed(),
                "{name} (second: {second}): {end:?} {text:?}"
            );
            expect_log(&spliced, me, &[("outcome", outcome)])
                .with_context(|| format!("{name} (second: {second})"))?;
        }
    }
    // Only an invalid chunk's head could go on (its body breaks later); no other refused
    // request reached the backend.
    let heads = app.heads();
    let reached: Vec<&String> = heads
        .iter()
        .filter(|h| !h.starts_with("GET /first ") && !h.starts_with("POST /chunk "))
        .collect();
    ensure!(
        reached.is_empty(),
        "refused requests reached the backend: {reached:#?}"
    );
    let metrics = spliced.metrics()?;
    for (_, _, outcome) in cases {
        // Two cases each for these two reasons, alone and second: four connections.
        let want = if matches!(outcome, "bare_line_ending" | "bad_transfer_encoding") {
            4
        } else {
            2
        };
        let got = metrics.count("spliced_connections_total", &[("outcome", outcome)])?;
        ensure!(got == want, "{outcome}: counted {got}, want {want}");
    }
    Ok(())
}

#[test]
fn bodiless_responses_are_not_misread() -> Result<()> {
    let (world, _app, spliced) = app_world()?;
    let (mut stream, mut reader) = client(&world)?;
    let me = stream.local_addr()?;
    stream.write_all(
        b"GET /204 HTTP/1.1\r\nHost: app.example\r\n\r\nGET /304 HTTP/1.1\r\nHost: app.example\r\n\r\n\
GET / HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )?;
    for (status, head_only) in [(204, true), (304, true), (200, false)] {
        let response = read_response(&mut reader, head_only)?;
        ensure!(response.status == status, "{}", response.head);
    }
    raw::shut_and_expect_eof(&mut stream, "after 204, 304 and 200")?;
    expect_log(&spliced, me, &[("requests", "3"), ("outcome", "ok")])?;
    Ok(())
}

/// A refused request waits for the responses to the requests before it, then gets its 400.
#[test]
fn a_refusal_comes_after_the_slow_responses_before_it() -> Result<()> {
    let (world, app, spliced) = app_world()?;
    let (got, end, me) = exchange(
        &world,
        b"GET /slow HTTP/1.1\r\nHost: app.example\r\n\r\nGET /slow HTTP/1.1\r\nHost: app.example\r\n\r\n\
POST /smuggle HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let text = String::from_utf8_lossy(&got);
    let statuses: Vec<&str> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| r.get(..3).unwrap_or(r))
        .collect();
    ensure!(
        statuses == ["200", "200", "400"] && end.closed(),
        "{end:?} {text:?}"
    );
    expect_log(
        &spliced,
        me,
        &[
            ("outcome", "content_length_and_transfer_encoding"),
            ("requests", "2"),
        ],
    )?;
    ensure!(app.heads().len() == 2, "{:#?}", app.heads());
    Ok(())
}

#[test]
fn a_later_request_for_another_site_gets_421() -> Result<()> {
    let (world, app, spliced) = app_world()?;
    let (got, end, me) = exchange(
        &world,
        b"GET /mine HTTP/1.1\r\nHost: app.example\r\n\r\n\
GET /theirs HTTP/1.1\r\nHost: other.example\r\n\r\nGET /after HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 200 OK\r\n")
            && text.contains("HTTP/1.1 421 Misdirected Request\r\n")
            && text.matches("HTTP/1.1").count() == 2
            && end.closed(),
        "{end:?} {text:?}"
    );
    expect_log(
        &spliced,
        me,
        &[("outcome", "misdirected_request"), ("requests", "1")],
    )?;
    let heads = app.heads();
    ensure!(
        heads.len() == 1 && heads[0].starts_with("GET /mine "),
        "the backend got {heads:#?}"
    );
    Ok(())
}
