//! Real servers nobody here wrote, run inside a [`World`]: nginx, Apache, HAProxy; plus a
//! self-signed certificate and curl as the client. spliced itself starts from
//! [`crate::spliced::Launch`].
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use crate::{BACKEND_V6, Ns, PROXY_V4, Service, World, wait_for};

/// Waits until something listens on TCP `port` inside `ns` (checked with `ss`, which sends no
/// traffic, so PROXY-expecting servers see no stray connection).
pub fn wait_listening(world: &World, ns: Ns, port: u16, service: &mut Service) -> Result<()> {
    wait_for(
        &format!("a listener on port {port}"),
        Duration::from_secs(10),
        || {
            service.check_running()?;
            let out = world
                .command(ns, "ss")
                .args(["-Hltn", &format!("sport = :{port}")])
                .output()?;
            Ok(!out.stdout.is_empty())
        },
    )
}

/// A self-signed certificate valid for `names`, written into the world's directory.
pub struct Cert {
    /// PEM certificate; also what clients trust.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Makes a self-signed ECDSA certificate for `names` with openssl.
pub fn cert(world: &World, names: &[&str]) -> Result<Cert> {
    let stem = names
        .first()
        .copied()
        .unwrap_or("cert")
        .replace('*', "wild");
    let cert = world.dir().join(format!("{stem}.crt"));
    let key = world.dir().join(format!("{stem}.key"));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={stem}")])
        .args(["-addext", &format!("subjectAltName={}", san.join(","))])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Cert { cert, key })
}

/// One nginx `server` block.
pub struct NginxServer<'a> {
    /// Port on the backend's IPv6 address.
    pub port: u16,
    /// `Some` serves HTTPS with this certificate.
    pub tls: Option<&'a Cert>,
    /// `listen ... proxy_protocol`.
    pub proxy_protocol: bool,
    /// `Some(proxy)`: take the client address from `X-Forwarded-For` when the peer is `proxy`
    /// (`set_real_ip_from` and `real_ip_header`); the log then shows it as `$remote_addr`.
    pub real_ip_from: Option<IpAddr>,
    /// Body of every response (also the file `/big` if `files` has it).
    pub body: &'a str,
}

/// The access log nginx writes for the server on `port`: one line per request, formatted
/// `client_addr:client_port "request" status` where the client is what PROXY announced (or the
/// TCP peer without PROXY).
pub fn nginx_log(world: &World, port: u16) -> PathBuf {
    world.dir().join(format!("nginx-{port}.log"))
}

/// Starts nginx in the backend namespace with `servers`; files in `<dir>/www` are served too.
pub fn nginx(world: &World, servers: &[NginxServer<'_>]) -> Result<Service> {
    let dir = world.dir().display().to_string();
    std::fs::create_dir_all(world.dir().join("www"))?;
    std::fs::create_dir_all(world.dir().join("nginx-tmp"))?;
    let mut conf = format!(
        "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log info;\n\
         daemon off;\nevents {{ worker_connections 4096; }}\nhttp {{\n\
         client_body_temp_path {dir}/nginx-tmp/body;\nproxy_temp_path {dir}/nginx-tmp/proxy;\n\
         fastcgi_temp_path {dir}/nginx-tmp/fastcgi;\nuwsgi_temp_path {dir}/nginx-tmp/uwsgi;\n\
         scgi_temp_path {dir}/nginx-tmp/scgi;\n\
         log_format pp '$proxy_protocol_addr:$proxy_protocol_port \"$request\" $status';\n\
         log_format plain '$remote_addr:$remote_port \"$request\" $status';\n"
    );
    for s in servers {
        let port = s.port;
        let mut listen = format!("[{BACKEND_V6}]:{port}");
        if s.tls.is_some() {
            listen.push_str(" ssl");
        }
        if s.proxy_protocol {
            listen.push_str(" proxy_protocol");
        }
        let format = if s.proxy_protocol { "pp" } else { "plain" };
        let _ = write!(
            conf,
            "server {{\n listen {listen};\n access_log {dir}/nginx-{port}.log {format};\n\
             root {dir}/www;\n location = / {{ default_type text/plain; return 200 \"{}\\n\"; }}\n",
            s.body
        );
        if let Some(proxy) = s.real_ip_from {
            let _ = write!(
                conf,
                " set_real_ip_from {proxy};\n real_ip_header X-Forwarded-For;\n"
            );
        }
        if let Some(cert) = s.tls {
            let _ = write!(
                conf,
                " ssl_certificate {};\n ssl_certificate_key {};\n",
                cert.cert.display(),
                cert.key.display()
            );
        }
        conf.push_str("}\n");
    }
    conf.push_str("}\n");
    let path = world.dir().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Backend, "nginx");
    cmd.arg("-c").arg(&path);
    let mut service = Service::start("nginx", cmd, world.dir())?.stop_with(Signal::SIGQUIT);
    for s in servers {
        wait_listening(world, Ns::Backend, s.port, &mut service)?;
    }
    Ok(service)
}

/// The access log Apache writes: `client_ip:client_port "request" status`, with the client
/// as mod_remoteip learned it from the PROXY header.
pub fn apache_log(world: &World) -> PathBuf {
    world.dir().join("apache-access.log")
}

/// How Apache's mod_remoteip learns the client address.
#[derive(Clone, Copy, Debug)]
pub enum RemoteIp {
    /// `RemoteIPProxyProtocol On`: from the PROXY header.
    ProxyProtocol,
    /// `RemoteIPHeader X-Forwarded-For` with `RemoteIPInternalProxy` set to this address.
    ForwardedFor(IpAddr),
    /// No mod_remoteip at all: `%a` is the TCP peer.
    Off,
}

/// Starts Apache with mod_remoteip `RemoteIPProxyProtocol On` on `port` of the backend's
/// address, HTTPS if `tls` is given; `/` answers with `body`.
pub fn apache(world: &World, port: u16, tls: Option<&Cert>, body: &str) -> Result<Service> {
    apache_with(world, port, tls, body, RemoteIp::ProxyProtocol)
}

/// [`apache`] with the client address taken as `remote_ip` says.
pub fn apache_with(
    world: &World,
    port: u16,
    tls: Option<&Cert>,
    body: &str,
    remote_ip: RemoteIp,
) -> Result<Service> {
    let dir = world.dir().display().to_string();
    let root = world.dir().join("apache-www");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(world.dir().join("apache-run"))?;
    std::fs::write(root.join("index.html"), format!("{body}\n"))?;
    let modules = "/usr/lib/apache2/modules";
    let mut conf = format!(
        "ServerName backend.test\nDefaultRuntimeDir {dir}/apache-run\nPidFile {dir}/apache.pid\n\
         LoadModule mpm_event_module {modules}/mod_mpm_event.so\n\
         LoadModule authz_core_module {modules}/mod_authz_core.so\n\
         LoadModule dir_module {modules}/mod_dir.so\n\
         {}\
         User www-data\nGroup www-data\n\
         Listen [{BACKEND_V6}]:{port}\nErrorLog {dir}/apache-error.log\nLogLevel info\n\
         LogFormat \"%a:%{{remote}}p \\\"%r\\\" %>s\" spliced\n\
         CustomLog {dir}/apache-access.log spliced\n\
         {}\nDocumentRoot {}\nDirectoryIndex index.html\n\
         <Directory {}>\n  Require all granted\n</Directory>\n",
        match remote_ip {
            RemoteIp::Off => String::new(),
            _ => format!("LoadModule remoteip_module {modules}/mod_remoteip.so\n"),
        },
        match remote_ip {
            RemoteIp::Off => String::new(),
            RemoteIp::ProxyProtocol => "RemoteIPProxyProtocol On".to_string(),
            RemoteIp::ForwardedFor(proxy) => {
                format!("RemoteIPHeader X-Forwarded-For\nRemoteIPInternalProxy {proxy}")
            }
        },
        root.display(),
        root.display()
    );
    if let Some(cert) = tls {
        let _ = write!(
            conf,
            "LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so\n\
             LoadModule ssl_module {modules}/mod_ssl.so\nSSLEngine on\n\
             SSLCertificateFile {}\nSSLCertificateKeyFile {}\n",
            cert.cert.display(),
            cert.key.display()
        );
    }
    let path = world.dir().join("apache.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Backend, "apache2");
    cmd.arg("-f").arg(&path).arg("-DFOREGROUND");
    // Apache's graceful-stop signal; it then waits for workers, which is what flushes logs.
    let mut service = Service::start("apache", cmd, world.dir())?.stop_with(Signal::SIGWINCH);
    wait_listening(world, Ns::Backend, port, &mut service)?;
    Ok(service)
}

/// Starts HAProxy in HTTP mode with `bind ... accept-proxy` on `port`, answering `body`.
/// Its log lines (`client_ip:client_port METHOD URI STATUS`) go to its standard output.
pub fn haproxy(world: &World, port: u16, body: &str) -> Result<Service> {
    let conf = format!(
        "global\n  log stdout format raw local0\n\
         defaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 30s\n\
         timeout server 30s\n\
         frontend fe\n  bind [{BACKEND_V6}]:{port} accept-proxy\n\
         log-format \"%ci:%cp %HM %HU %ST\"\n\
         http-request return status 200 content-type text/plain string \"{body}\"\n"
    );
    let path = world.dir().join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Backend, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut service = Service::start("haproxy", cmd, world.dir())?.stop_with(Signal::SIGUSR1);
    wait_listening(world, Ns::Backend, port, &mut service)?;
    Ok(service)
}

/// Runs curl in the client namespace from `source` against `url`, resolving every name to the
/// proxy and trusting `ca` for HTTPS. Returns curl's output (its status tells success).
pub fn curl(world: &World, source: IpAddr, url: &str, ca: Option<&Cert>) -> Result<Output> {
    curl_from(world, source, None, url, ca)
}

/// Like [`curl`], from a fixed local port so a backend's log line can be matched exactly.
pub fn curl_from(
    world: &World,
    source: IpAddr,
    local_port: Option<u16>,
    url: &str,
    ca: Option<&Cert>,
) -> Result<Output> {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .context("URL without a host")?;
    let port = if url.starts_with("https") { 443 } else { 80 };
    let mut cmd = curl_command(world, source, host, port);
    if let Some(port) = local_port {
        cmd.args(["--local-port", &port.to_string()]);
    }
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(&ca.cert);
    }
    cmd.arg(url);
    Ok(cmd.output()?)
}

/// curl in the client namespace from `source`, with `host` on `port` resolved to the proxy
/// and 10 s for everything; add the rest (headers, URLs, `--next`).
pub fn curl_command(world: &World, source: IpAddr, host: &str, port: u16) -> Command {
    let mut cmd = world.command(Ns::Client, "curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--interface",
        &source.to_string(),
    ])
    .args(["--resolve", &format!("{host}:{port}:{PROXY_V4}")]);
    cmd
}

/// The proxy's client-facing address on `port`.
pub fn proxy_addr(port: u16) -> SocketAddr {
    SocketAddr::new(PROXY_V4, port)
}

/// Reads a log file, waiting up to 5 s for it to contain `needle` (servers write logs after
/// the response went out).
pub fn wait_log(path: &std::path::Path, needle: &str) -> Result<String> {
    let mut text = String::new();
    let found = wait_for(
        &format!("{needle:?} in {}", path.display()),
        Duration::from_secs(5),
        || {
            text = std::fs::read_to_string(path).unwrap_or_default();
            Ok(text.contains(needle))
        },
    );
    found.with_context(|| format!("log so far:\n{text}"))?;
    Ok(text)
}
