//! Renders a chat template in a child process under a memory limit.
//!
//! minijinja bounds a render's instructions and output but not its memory: `{% set ns.s =
//! ns.s ~ ns.s %}` in a loop doubles a string per step, and forty steps ask for a terabyte. A
//! template comes with the model artifact, so the daemon renders it in a child, started
//! lazily from its own executable (`/proc/self/exe`, which still names the running image after
//! a package upgrade replaced the file), with `RLIMIT_AS` at [`Settings::memory_limit`] and no
//! core dumps. A template past the limit makes the child's allocation fail and the child abort;
//! the request gets a template error (400), the daemon keeps serving, and the next render
//! starts a fresh child. A render that outlasts [`Settings::timeout`] (fuel bounds instructions,
//! not their cost: a loop of 100 MB string repetitions) has its child killed the same way.
//!
//! The protocol is JSON lines on the child's stdin and stdout: first the [`Spec`], answered
//! `Ok(())` once the child has limited itself and compiled the template (so a program that is not
//! an edgeflow binary, or a limit the system refuses, fails loudly instead of rendering
//! unbounded), then one request per render, answered with its [`Rendered`] or [`RenderError`].
//! One engine thread renders at a time, so a mutex serializes renders on one child per model.

use std::borrow::Cow;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{RenderError, Rendered, Spec, Template};
use crate::engine::tokenizer::{ChatMessage, MAX_RENDERED_BYTES};

/// The first argument that makes an edgeflow binary a sandbox child (see [`child_main`]).
pub const ARG: &str = "__chat-template-sandbox";

/// Memory a child may map, program included (the edgeflow binary maps ~40 MiB at start; a
/// render of a real template needs a few MiB for a 4 MiB prompt).
pub const MEMORY_LIMIT: u64 = 256 << 20;

/// Longest a render may take in the child. Real templates render in microseconds to
/// milliseconds; fuel stops an endless loop within a second.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply line longer than this is a child gone wrong: a rendered prompt is at most
/// [`MAX_RENDERED_BYTES`], and JSON escaping at most sextuples it.
const MAX_REPLY_BYTES: u64 = (MAX_RENDERED_BYTES as u64) * 6 + 4096;

/// How sandboxes are started by the binary that hosts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// An edgeflow binary (its `main` handles [`ARG`]).
    pub program: PathBuf,
    pub memory_limit: u64,
    pub timeout: Duration,
}

impl Settings {
    /// Sandboxes run by `program`, with the default limits.
    pub fn new(program: PathBuf) -> Settings {
        Settings { program, memory_limit: MEMORY_LIMIT, timeout: RENDER_TIMEOUT }
    }

    /// Sandboxes run by the executable of this process.
    pub fn this_binary() -> Settings {
        let program = PathBuf::from("/proc/self/exe");
        if program.exists() {
            return Settings::new(program);
        }
        Settings::new(std::env::current_exe().unwrap_or(program))
    }
}

static HOST: RwLock<Option<Settings>> = RwLock::new(None);

/// Declares that this process can host sandboxes (`Some`), or no longer (`None`): chat
/// templates of models loaded from now on render in a child started this way. Called by the
/// `edgeflow` binary's `main`; a test or program embedding the library may call it with the
/// path of an edgeflow binary.
pub fn host(settings: Option<Settings>) {
    *HOST.write().unwrap_or_else(PoisonError::into_inner) = settings;
}

/// How sandboxes are started in this process, if it hosts them.
pub fn hosted() -> Option<Settings> {
    HOST.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// One render, as sent to the child.
#[derive(Serialize, Deserialize)]
struct Request<'a> {
    messages: Cow<'a, [ChatMessage]>,
    limit: usize,
}

/// A chat template rendered in a child process (started on first use, restarted after a
/// death).
pub struct Sandbox {
    settings: Settings,
    spec: Spec,
    child: Mutex<Option<Running>>,
}

impl Sandbox {
    pub fn new(settings: Settings, spec: Spec) -> Sandbox {
        Sandbox { settings, spec, child: Mutex::new(None) }
    }

    /// Renders `messages` in the child, starting one if none runs.
    ///
    /// # Errors
    /// The template's own [`RenderError`]s, and [`RenderError::Sandbox`] when the child
    /// cannot start, dies (a template past the memory limit) or outlasts the timeout.
    pub fn render(&self, messages: &[ChatMessage], limit: usize) -> Result<Rendered, RenderError> {
        let mut slot = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let running = match slot.as_mut() {
            Some(running) => running,
            None => slot.insert(self.start()?),
        };
        let request = Request { messages: Cow::Borrowed(messages), limit };
        match running.ask::<_, Result<Rendered, RenderError>>(&request, self.settings.timeout) {
            Ok(reply) => reply,
            Err(failure) => {
                let why = slot.take().map_or_else(String::new, |r| r.stop(&failure, &self.settings));
                tracing::warn!(program = %self.settings.program.display(), reason = %why, "the chat template's sandbox was lost; the next render starts a new one");
                Err(RenderError::Sandbox(why))
            }
        }
    }

    /// Starts a child and hands it the template.
    fn start(&self) -> Result<Running, RenderError> {
        let program = &self.settings.program;
        let unstarted = |why: String| RenderError::Sandbox(format!("the chat template's sandbox ({}) did not start: {why}", program.display()));
        let mut child = Command::new(program)
            .arg(ARG)
            .arg(self.settings.memory_limit.to_string())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| unstarted(e.to_string()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(unstarted("its pipes were not set up".into()));
        };
        let (replies_in, replies) = std::sync::mpsc::sync_channel(1);
        let reader = std::thread::Builder::new().name("chat-template-sandbox".into()).spawn(move || read_replies(stdout, &replies_in));
        let mut running = Running { child, stdin, replies };
        if let Err(e) = reader {
            return Err(unstarted(running.stop(&Failure::Garbled(e.to_string()), &self.settings)));
        }
        match running.ask::<_, Result<(), String>>(&self.spec, self.settings.timeout) {
            Ok(Ok(())) => {
                tracing::debug!(program = %program.display(), pid = running.child.id(), "chat template sandbox started");
                Ok(running)
            }
            Ok(Err(refusal)) => Err(unstarted(running.stop(&Failure::Garbled(refusal), &self.settings))),
            Err(failure) => Err(unstarted(running.stop(&failure, &self.settings))),
        }
    }
}

/// A started child and the two ends of its conversation.
struct Running {
    child: Child,
    stdin: ChildStdin,
    /// Lines the reader thread read from the child's stdout; disconnected at its end.
    replies: Receiver<Result<Vec<u8>, String>>,
}

/// Why a conversation with the child broke off.
enum Failure {
    Timeout,
    Died,
    Garbled(String),
}

impl Running {
    fn ask<Q: Serialize, A: DeserializeOwned>(&mut self, question: &Q, timeout: Duration) -> Result<A, Failure> {
        let mut line = serde_json::to_vec(question).map_err(|e| Failure::Garbled(e.to_string()))?;
        line.push(b'\n');
        // A dead child shows as EPIPE here (Rust programs ignore SIGPIPE) or as the reader's end.
        if self.stdin.write_all(&line).and_then(|()| self.stdin.flush()).is_err() {
            return Err(Failure::Died);
        }
        match self.replies.recv_timeout(timeout) {
            Ok(Ok(reply)) => serde_json::from_slice(&reply).map_err(|e| Failure::Garbled(format!("an unreadable reply: {e}"))),
            Ok(Err(why)) => Err(Failure::Garbled(why)),
            Err(RecvTimeoutError::Timeout) => Err(Failure::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Failure::Died),
        }
    }

    /// Kills and reaps the child; says what became of it.
    fn stop(mut self, failure: &Failure, settings: &Settings) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().map_or_else(|e| format!("status unknown: {e}"), |s| s.to_string());
        match failure {
            Failure::Timeout => format!("the chat template took longer than {:?} to render; its sandbox was stopped", settings.timeout),
            Failure::Died => {
                format!("the chat template's sandbox died ({status}); a template that builds values past its {} MiB memory limit ends this way", settings.memory_limit >> 20)
            }
            Failure::Garbled(why) => format!("the chat template's sandbox failed ({why}) and was stopped ({status})"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards the child's reply lines until it closes its stdout or the listener goes.
fn read_replies(stdout: ChildStdout, replies: &SyncSender<Result<Vec<u8>, String>>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        let reply = match reader.by_ref().take(MAX_REPLY_BYTES).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) if line.last() == Some(&b'\n') => Ok(line),
            Ok(n) if n as u64 == MAX_REPLY_BYTES => Err(format!("a reply longer than {MAX_REPLY_BYTES} bytes")),
            Ok(_) => Err("a reply cut short".to_string()),
            Err(e) => Err(format!("reading its reply: {e}")),
        };
        let last = reply.is_err();
        if replies.send(reply).is_err() || last {
            return;
        }
    }
}

/// The child: limits its memory, compiles the template it is sent, then renders requests
/// until its stdin closes. `args` are the arguments after [`ARG`] (the memory limit).
pub fn child_main(args: &[OsString]) -> ExitCode {
    let stdin = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    let mut lines = stdin.lines();
    let limited = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse::<u64>().ok())
        .ok_or_else(|| format!("usage: edgeflow {ARG} MEMORY_LIMIT_BYTES (an internal command)"))
        .and_then(limit_resources);
    let template = match lines.next() {
        Some(Ok(line)) => limited.and_then(|()| serde_json::from_str::<Spec>(&line).map_err(|e| e.to_string())).and_then(Template::compile),
        _ => return ExitCode::FAILURE,
    };
    if answer(&mut out, &template.as_ref().map(|_| ()).map_err(Clone::clone)).is_err() {
        return ExitCode::FAILURE;
    }
    let Ok(template) = template else { return ExitCode::FAILURE };
    for line in lines {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => template.render(&request.messages, request.limit),
            Err(e) => Err(RenderError::Failed(format!("the sandbox could not read the request: {e}"))),
        };
        if answer(&mut out, &reply).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

fn answer<T: Serialize>(out: &mut impl Write, reply: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, reply)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Caps the address space at `memory` bytes and turns off core dumps.
fn limit_resources(memory: u64) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    // rlim_t is 32 bits on ARMv7: a limit past it is no limit there anyway.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let memory = nix::libc::rlim_t::try_from(memory).unwrap_or(nix::libc::rlim_t::MAX);
    setrlimit(Resource::RLIMIT_AS, memory, memory).map_err(|e| format!("limiting its memory to {memory} bytes: {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("turning off core dumps: {e}"))
}
