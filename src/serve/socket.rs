//! The local API's Unix socket: binding it safely, and who is on the other end.
//!
//! [`bind`] is for the caller (`main`, the daemon, a test): it refuses to replace anything
//! but a stale socket, and the socket appears at its path only once its group and mode are
//! set (it is bound under a temporary name and renamed into place), so there is no moment
//! when a wider audience could connect. Each accepted connection carries the peer's
//! credentials (`SO_PEERCRED`), which the router logs per request and checks against the
//! allow-lists.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The group owning the socket: a name looked up in the system's group database, or a gid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupSpec {
    Id(u32),
    Name(String),
}

impl std::fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSpec::Id(gid) => write!(f, "gid {gid}"),
            GroupSpec::Name(name) => write!(f, "group {name}"),
        }
    }
}

impl std::str::FromStr for GroupSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(s.parse().map(GroupSpec::Id).unwrap_or_else(|_| GroupSpec::Name(s.to_string())))
    }
}

impl GroupSpec {
    /// # Errors
    /// [`SocketError::UnknownGroup`] when the name is not in the group database.
    pub fn resolve(&self) -> Result<u32, SocketError> {
        match self {
            GroupSpec::Id(gid) => Ok(*gid),
            GroupSpec::Name(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(group)) => Ok(group.gid.as_raw()),
                Ok(None) => Err(SocketError::UnknownGroup { group: name.clone(), source: None }),
                Err(e) => Err(SocketError::UnknownGroup { group: name.clone(), source: Some(io::Error::from(e)) }),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("the socket's directory {} does not exist or is not a directory", .dir.display())]
    NoDirectory { dir: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket { path: PathBuf },
    #[error("another server is listening on {}", .path.display())]
    InUse { path: PathBuf },
    #[error("could not check the existing socket {}", .path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unknown group {group}")]
    UnknownGroup {
        group: String,
        #[source]
        source: Option<io::Error>,
    },
    #[error("could not {step} socket {}", .path.display())]
    Setup {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where and how to create the socket.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Permission bits, e.g. `0o660`.
    pub mode: u32,
    pub group: Option<GroupSpec>,
}

/// The socket's file; dropping it removes the file if it is still this server's.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Another server may have replaced a socket we thought stale; never delete theirs.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the socket at `options.path` with its group and mode; must be called inside a
/// tokio runtime.
///
/// An existing socket that nobody answers on is removed; a live one or any other kind of
/// file is an error.
///
/// # Errors
/// [`SocketError`] naming the path and the step that failed.
pub fn bind(options: &SocketOptions) -> Result<(UnixListener, SocketFile), SocketError> {
    let path = &options.path;
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Err(SocketError::NoDirectory { dir: path.clone() }),
    };
    if !dir.is_dir() {
        return Err(SocketError::NoDirectory { dir: dir.to_path_buf() });
    }
    remove_if_stale(path)?;
    let gid = options.group.as_ref().map(GroupSpec::resolve).transpose()?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "socket".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let setup = |step: &'static str| move |source: io::Error| SocketError::Setup { step, path: path.clone(), source };
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(setup("bind"))?;
    let finish = || -> Result<(), SocketError> {
        // Already the process's group (the unit's `Group=edgeflow-api`): no chown, which the
        // unit's system call filter would refuse.
        if let Some(gid) = gid.filter(|g| *g != nix::unistd::getegid().as_raw()) {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(setup("set the group of"))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(options.mode)).map_err(setup("set the mode of"))?;
        std::fs::rename(&tmp, path).map_err(setup("move into place"))?;
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path).map_err(setup("stat"))?;
    let file = SocketFile { path: path.clone(), dev: meta.dev(), ino: meta.ino() };
    listener.set_nonblocking(true).map_err(setup("configure"))?;
    let listener = UnixListener::from_std(listener).map_err(setup("register"))?;
    Ok((listener, file))
}

/// The listening socket systemd passed through socket activation (an `edgeflow.socket`
/// unit: `LISTEN_PID` is this process, `LISTEN_FDS` ≥ 1, the socket is fd 3), if any. Its
/// path, mode and group are the unit's (`ListenStream=`, `SocketMode=`, `SocketGroup=`).
/// Must be called inside a tokio runtime.
///
/// # Errors
/// [`SocketError::Setup`] when fd 3 is not a Unix socket.
pub fn from_systemd() -> Result<Option<UnixListener>, SocketError> {
    const SD_LISTEN_FDS_START: i32 = 3;
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !ours || count < 1 {
        return Ok(None);
    }
    if count > 1 {
        tracing::warn!(count, "systemd passed several sockets; serving the first");
    }
    let setup = |step: &'static str| move |source: io::Error| SocketError::Setup { step, path: PathBuf::from("<systemd fd 3>"), source };
    // DEVNOTE: systemd guarantees fd 3 is open and ours when LISTEN_PID names this process;
    // nothing else in edgeflow opens or closes it, so taking ownership here is sound.
    let listener = unsafe { <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(SD_LISTEN_FDS_START) };
    // Refuses a TCP or datagram socket: getsockname must report a Unix address.
    let addr = listener.local_addr().map_err(setup("use the systemd-passed"))?;
    listener.set_nonblocking(true).map_err(setup("configure"))?;
    tracing::info!(path = ?addr.as_pathname(), "serving on the socket passed by systemd");
    UnixListener::from_std(listener).map(Some).map_err(setup("register"))
}

fn remove_if_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(SocketError::Probe { path: path.to_path_buf(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket { path: path.to_path_buf() });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|source| SocketError::Setup { step: "remove the stale", path: path.to_path_buf(), source })
        }
        Err(source) => Err(SocketError::Probe { path: path.to_path_buf(), source }),
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// From `SO_PEERCRED`: the connecting process's ids at `connect()` time.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Tcp(SocketAddr),
    /// Credentials could not be read (the kernel refused); treated as unknown by the
    /// allow-lists, i.e. refused when they are set.
    Unknown,
}

/// A Unix listener whose connections carry their peer's credentials.
pub struct UnixPeers(pub UnixListener);

/// A TCP listener whose connections carry their peer's address.
pub struct TcpPeers(pub TcpListener);

impl axum::serve::Listener for UnixPeers {
    type Io = UnixStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (UnixStream, Peer) {
        loop {
            match self.0.accept().await {
                Ok((stream, _)) => {
                    let peer = match stream.peer_cred() {
                        Ok(c) => Peer::Unix { uid: c.uid(), gid: c.gid(), pid: c.pid() },
                        Err(e) => {
                            tracing::warn!(error = %e, "could not read the peer's credentials");
                            Peer::Unknown
                        }
                    };
                    return (stream, peer);
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer::Unknown)
    }
}

impl axum::serve::Listener for TcpPeers {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (TcpStream, Peer) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (stream, Peer::Tcp(addr));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        self.0.local_addr().map(Peer::Tcp)
    }
}

/// As hyper's server did: a client that vanished mid-handshake is nothing; anything else
/// (typically EMFILE) is logged and accepting pauses briefly instead of spinning.
async fn accept_failed(e: io::Error) {
    if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_mode_replaces_stale_and_refuses_live_or_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A stale socket: bound, then its listener dropped without unlinking.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let options = SocketOptions { path: path.clone(), mode: 0o660, group: Some(GroupSpec::Id(nix::unistd::getgid().as_raw())) };
        let (listener, file) = bind(&options).expect("stale socket replaced");
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert!(matches!(bind(&options), Err(SocketError::InUse { .. })), "a live socket is never replaced");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
        drop(listener);
        drop(file);
        assert!(!path.exists(), "the socket file is removed with its SocketFile");

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(bind(&options), Err(SocketError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

        let missing = SocketOptions { path: dir.path().join("no/such/dir/api.sock"), ..options.clone() };
        assert!(matches!(bind(&missing), Err(SocketError::NoDirectory { .. })));
        let unknown = SocketOptions { path: dir.path().join("b.sock"), group: Some(GroupSpec::Name("edgeflow-no-such-group".into())), ..options };
        assert!(matches!(bind(&unknown), Err(SocketError::UnknownGroup { .. })));
    }

    #[test]
    fn group_specs_parse_from_names_and_numbers() {
        assert_eq!("1234".parse::<GroupSpec>().unwrap(), GroupSpec::Id(1234));
        assert_eq!("edgeflow".parse::<GroupSpec>().unwrap(), GroupSpec::Name("edgeflow".into()));
        assert_eq!(GroupSpec::Name("root".into()).resolve().unwrap(), 0);
    }
}
