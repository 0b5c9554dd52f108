//! The fleet tests' peers: a real Mosquitto broker per test (own config, own loopback port,
//! own folder; stopped, killed and started again at will), certificates made with openssl,
//! `mosquitto_sub`/`mosquitto_pub` as the independent client, fleet settings and the payload
//! schema check. Two relays stand between a device and a broker where a real peer cannot do
//! what a test needs: [`Proxy`] counts bytes and can play a broker that only speaks MQTT 3.1.1;
//! [`Gate`] keeps a restarted broker out of the device's reach until the test's observers are
//! back on it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, wait_port};

/// One `mosquitto` process with its own config and folder.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Mosquitto {
    /// A plain listener on a free port; `extra` is appended to the listener's config.
    pub fn start(extra: &str) -> Mosquitto {
        let port = free_port();
        Mosquitto::start_on(port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"))
    }

    /// `conf` is the whole config (listener lines included) for `port`; `{dir}` stands for
    /// the broker's own folder.
    pub fn start_on(port: u16, conf: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mosquitto.conf");
        // Run as whoever runs the tests (mosquitto drops root to its own user otherwise,
        // which cannot read our temp folder); log to a file for post-mortems.
        let user = if nix::unistd::Uid::effective().is_root() { "user root\n" } else { "" };
        let conf = conf.replace("{dir}", &dir.path().display().to_string());
        let text = format!("{user}log_dest file {}\nlog_type all\nmax_queued_messages 100000\n{conf}", dir.path().join("mosquitto.log").display());
        std::fs::write(&path, text).expect("write mosquitto.conf");
        let mut m = Mosquitto { child: None, port, dir, conf: path };
        m.launch();
        m
    }

    /// Starts it again (after [`Mosquitto::kill`] or [`Mosquitto::stop`]) on the same port
    /// with the same config.
    pub fn launch(&mut self) {
        // Debian installs the broker in /usr/sbin, which a non-root PATH may lack.
        let exe = if Path::new("/usr/sbin/mosquitto").exists() { "/usr/sbin/mosquitto" } else { "mosquitto" };
        let child = Command::new(exe).arg("-c").arg(&self.conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("mosquitto is installed (apt-get install mosquitto)");
        self.child = Some(child);
        assert!(wait_port(self.port, Duration::from_secs(10)), "mosquitto did not listen on {}:\n{}", self.port, self.log());
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM, so a persistent one saves its state).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// SIGKILL: the broker dies at once, saving nothing (sessions, queued and retained
    /// messages since its last save are gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
/// unrelated CA, all made with openssl (P-256 keys).
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn make() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let sh = |script: &str| {
            let out = Command::new("bash").arg("-ec").arg(script).current_dir(d).output().expect("bash and openssl");
            assert!(out.status.success(), "openssl failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        let key = |name: &str| format!("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {name}.key");
        let ca = |name: &str| {
            format!("{}\nopenssl req -x509 -new -key {name}.key -out {name}.pem -days 2 -subj /CN={name} -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign", key(name))
        };
        let leaf = |name: &str, cn: &str, ext: &str| {
            format!(
                "{}\nopenssl req -new -key {name}.key -out {name}.csr -subj /CN={cn}\nprintf '{ext}\\nbasicConstraints=CA:FALSE\\nkeyUsage=critical,digitalSignature\\n' > {name}.ext\nopenssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext",
                key(name)
            )
        };
        sh(&[
            ca("ca"),
            ca("other-ca"),
            leaf("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth"),
            leaf("client", "device-tls", "extendedKeyUsage=clientAuth"),
        ]
        .join("\n"));
        Certs { dir }
    }

    /// Listener lines for a TLS listener on `port`; `require_client` turns on mTLS.
    pub fn listener(&self, port: u16, require_client: bool) -> String {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client}\n",
            self.path("ca.pem").display(),
            self.path("server.pem").display(),
            self.path("server.key").display()
        )
    }
}

/// One message as `mosquitto_sub` printed it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub retained: bool,
    /// MQTT 5 correlation data (printable in these tests), empty when absent.
    pub correlation: String,
    pub payload: String,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or_else(|e| panic!("payload on {} is not JSON ({e}): {}", self.topic, self.payload))
    }
}

/// A `mosquitto_sub` process collecting messages (MQTT 5, QoS 1). It reconnects and
/// subscribes again by itself when the broker comes back.
pub struct Sub {
    child: Child,
    msgs: Arc<Mutex<Vec<Msg>>>,
    ready: String,
}

impl Sub {
    /// Subscribes to `filters` on a plain broker; returns once the subscription is live.
    pub fn start(port: u16, filters: &[&str]) -> Sub {
        Sub::start_with(port, filters, &[])
    }

    /// `extra`: more mosquitto_sub arguments (e.g. a persistent session: `-c -i id`).
    pub fn start_with(port: u16, filters: &[&str], extra: &[&str]) -> Sub {
        let ready = format!("test/ready/{}", fastrand::u64(..));
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5", "-q", "1", "-F", "%t\\t%r\\t%D\\t%p"]).args(extra).args(["-t", &ready]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("mosquitto_sub is installed (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().expect("piped stdout");
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let sink = msgs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(4, '\t');
                let (Some(topic), Some(r), Some(c), Some(p)) = (parts.next(), parts.next(), parts.next(), parts.next()) else { continue };
                sink.lock().unwrap().push(Msg { topic: topic.into(), retained: r == "1", correlation: c.into(), payload: p.into() });
            }
        });
        let sub = Sub { child, msgs, ready };
        assert!(sub.subscribed(port, Duration::from_secs(10)), "mosquitto_sub did not subscribe");
        sub
    }

    /// Whether the subscription is live on the broker at `port` (again, after a restart)
    /// within `timeout`: a marker published on its own topic comes back.
    pub fn subscribed(&self, port: u16, timeout: Duration) -> bool {
        let marker = format!("ready-{}", fastrand::u64(..));
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if try_publish(port, &self.ready, &marker, &[]) && self.wait_raw(|m| m.topic == self.ready && m.payload == marker, Duration::from_millis(300)).is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().iter().filter(|m| !m.topic.starts_with("test/ready/")).cloned().collect()
    }

    /// Messages received from index `start` on (readiness markers are counted, so indexes
    /// stay put, but not returned), and the index to continue from.
    pub fn since(&self, start: usize) -> (Vec<Msg>, usize) {
        let msgs = self.msgs.lock().unwrap();
        let start = start.min(msgs.len());
        (msgs[start..].iter().filter(|m| !m.topic.starts_with("test/ready/")).cloned().collect(), msgs.len())
    }

    /// Messages on `topic`, as JSON.
    pub fn json_on(&self, topic: &str) -> Vec<Value> {
        self.all().into_iter().filter(|m| m.topic == topic).map(|m| m.json()).collect()
    }

    /// The first message matching `pred` within `timeout` (readiness markers excluded).
    pub fn wait(&self, pred: impl Fn(&Msg) -> bool, timeout: Duration) -> Option<Msg> {
        self.wait_raw(|m| !m.topic.starts_with("test/ready/") && pred(m), timeout)
    }

    fn wait_raw(&self, pred: impl Fn(&Msg) -> bool, timeout: Duration) -> Option<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.msgs.lock().unwrap().iter().find(|m| pred(m)) {
                return Some(m.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` messages match `pred`.
    pub fn wait_count(&self, pred: impl Fn(&Msg) -> bool, count: usize, timeout: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Msg> = self.msgs.lock().unwrap().iter().filter(|m| !m.topic.starts_with("test/ready/") && pred(m)).cloned().collect();
            if found.len() >= count || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub` one QoS 1 message; `extra` adds arguments (e.g. MQTT 5 properties).
pub fn publish(port: u16, topic: &str, payload: &str, extra: &[&str]) {
    let out = mosquitto_pub(port, topic, payload, extra);
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// As [`publish`], for a broker that may be down: whether the broker acknowledged it.
pub fn try_publish(port: u16, topic: &str, payload: &str, extra: &[&str]) -> bool {
    mosquitto_pub(port, topic, payload, extra).status.success()
}

fn mosquitto_pub(port: u16, topic: &str, payload: &str, extra: &[&str]) -> std::process::Output {
    Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload]).args(extra).output().expect("mosquitto_pub")
}

/// A command on MQTT 5 with a response topic and correlation data.
pub fn publish_v5_command(port: u16, topic: &str, payload: &str, response_topic: &str, correlation: &str) {
    assert!(try_publish_v5_command(port, topic, payload, response_topic, correlation), "mosquitto_pub failed");
}

/// As [`publish_v5_command`], for a broker that may be down: whether the broker acknowledged it.
pub fn try_publish_v5_command(port: u16, topic: &str, payload: &str, response_topic: &str, correlation: &str) -> bool {
    try_publish(port, topic, payload, &["-V", "mqttv5", "-D", "publish", "response-topic", response_topic, "-D", "publish", "correlation-data", correlation])
}

/// A TCP relay to a broker that counts the bytes each way. With `only_3_1_1`, it answers an
/// MQTT 5 CONNECT the way a 3.1.1-only broker does (CONNACK, return code 1: unacceptable
/// protocol version) and hangs up, and relays 3.1.1 connections.
pub struct Proxy {
    pub port: u16,
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    pub refused_v5: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16, only_3_1_1: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (up, down, refused_v5, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (u, d, r, s) = (up.clone(), down.clone(), refused_v5.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut client) = client else { continue };
                let (u, d, r) = (u.clone(), d.clone(), r.clone());
                std::thread::spawn(move || {
                    // CONNECT: type byte, remaining length (1-4 bytes), protocol name
                    // ("\0\x04MQTT"), protocol level (4 = 3.1.1, 5 = MQTT 5).
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    let mut read = |n: usize, head: &mut Vec<u8>| -> bool {
                        (0..n).all(|_| {
                            client.read_exact(&mut byte).is_ok() && {
                                head.push(byte[0]);
                                true
                            }
                        })
                    };
                    if !read(1, &mut head) {
                        return;
                    }
                    loop {
                        if !read(1, &mut head) {
                            return;
                        }
                        if head[head.len() - 1] & 0x80 == 0 || head.len() >= 5 {
                            break;
                        }
                    }
                    if !read(7, &mut head) {
                        return;
                    }
                    if only_3_1_1 && head[head.len() - 1] == 5 {
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = client.write_all(&[0x20, 0x02, 0x00, 0x01]);
                        return;
                    }
                    relay(client, &head, upstream, &u, &d);
                });
            }
        });
        Proxy { port, up, down, refused_v5, stop }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Relays `client` to the broker on `upstream` (after sending it `head`, bytes already read
/// from the client) until either side hangs up, counting the bytes each way; returns then.
fn relay(mut client: TcpStream, head: &[u8], upstream: u16, up: &AtomicU64, down: &Arc<AtomicU64>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    if server.write_all(head).is_err() {
        return;
    }
    up.fetch_add(head.len() as u64, Ordering::SeqCst);
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { return };
    let d = down.clone();
    std::thread::spawn(move || copy_counting(&mut s2, &mut c2, &d));
    copy_counting(&mut client, &mut server, up);
}

/// A relay on a fixed loopback port to the broker on `upstream` that can be closed and
/// opened. Closed, nothing listens on its port, so a device's connection is refused exactly
/// as by a dead broker; open, each connection is relayed, and one ends when the broker's end
/// does (a broker killed behind it hangs up on the device at once).
///
/// A SIGKILLed broker keeps no session, so after its restart a subscriber sees only what
/// arrives once it has subscribed again. A broker-fault campaign therefore closes the gate
/// before each kill and opens it after the restart only when its observer is back: whatever
/// the device publishes on the restarted broker then has a subscriber to reach.
pub struct Gate {
    pub port: u16,
    upstream: u16,
    /// Connections relayed so far.
    pub accepted: Arc<AtomicU64>,
    open: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Gate {
    /// A closed gate in front of the broker on `upstream`.
    pub fn closed(upstream: u16) -> Gate {
        Gate { port: free_port(), upstream, accepted: Arc::new(AtomicU64::new(0)), open: None }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Listens on the gate's port again and relays every connection from now on.
    pub fn open(&mut self) {
        if self.open.is_some() {
            return;
        }
        // The port was ours a moment ago; bind retries while the kernel lets it go.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the gate cannot listen on {} again: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, upstream, accepted) = (stop.clone(), self.upstream, self.accepted.clone());
        let thread = std::thread::spawn(move || {
            let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let _ = client.set_nonblocking(false);
                        let (up, down) = (up.clone(), down.clone());
                        std::thread::spawn(move || relay(client, &[], upstream, &up, &down));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // The listener is dropped here: the port refuses connections from now on.
        });
        self.open = Some((stop, thread));
    }

    /// Stops listening: new connections are refused (relayed ones run on until a side ends).
    pub fn close(&mut self) {
        if let Some((stop, thread)) = self.open.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

fn copy_counting(from: &mut TcpStream, to: &mut TcpStream, counter: &AtomicU64) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Fleet settings for a test: `[fleet]` TOML lines on top of a device id, broker and spool.
pub fn settings(broker: &str, device: &str, spool: &Path, extra: &str) -> edgeflow::fleet::FleetSettings {
    // Tests that say nothing of signatures take unsigned commands, explicitly (the default
    // without a key is to refuse to start).
    let signatures = if extra.contains("require_signatures") || extra.contains("signature_public_key") { "" } else { "require_signatures = false\n" };
    let text = format!(
        "[fleet]\nbroker = \"{broker}\"\ndevice_id = \"{device}\"\nspool_dir = \"{}\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n{signatures}{extra}",
        spool.display()
    );
    let config: edgeflow::config::Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    config.fleet.resolve().unwrap_or_else(|p| panic!("{p:#?}")).expect("a broker is set")
}

/// Checks a payload against the documented schema: each `(key, kind)` must be present with
/// that JSON kind (`"u"` unsigned integer, `"n"` number, `"s"` string, `"b"` bool, `"o"`
/// object, `"a"` array, `"s?"`/`"o?"`/`"n?"` the same or null).
pub fn assert_schema(v: &Value, fields: &[(&str, &str)]) {
    for (key, kind) in fields {
        let mut cur = v;
        for part in key.split('.') {
            cur = cur.get(part).unwrap_or_else(|| panic!("`{key}` missing in {v}"));
        }
        let ok = match *kind {
            "u" => cur.is_u64(),
            "n" => cur.is_number(),
            "s" => cur.is_string(),
            "b" => cur.is_boolean(),
            "o" => cur.is_object(),
            "a" => cur.is_array(),
            "s?" => cur.is_string() || cur.is_null(),
            "o?" => cur.is_object() || cur.is_null(),
            "n?" => cur.is_number() || cur.is_null(),
            other => panic!("unknown kind {other}"),
        };
        assert!(ok, "`{key}` should be {kind}, is {cur} in {v}");
    }
}
