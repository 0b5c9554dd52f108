//! The chat template: code from the model's artifact, run on every chat request.
//!
//! [`Template`] compiles it once (minijinja, with the functions Hugging Face templates call)
//! and renders within bounds minijinja can enforce: at most [`CHAT_TEMPLATE_FUEL`]
//! instructions, its recursion limit, and an output ceiling the caller gives. Memory it cannot
//! bound: a chain of `~` concatenations doubles a string per instruction, so a dozen
//! instructions of a hostile template ask for gigabytes. [`ChatTemplate`] therefore renders in
//! a child process under a memory limit ([`sandbox`]) whenever the running binary can host one
//! (the `edgeflow` binary registers itself at start-up); the library's own tests and programs
//! that embed it without registering render in this process, bounded by fuel and output only.

pub mod sandbox;

use serde::{Deserialize, Serialize};

use super::tokenizer::ChatMessage;

/// Template instructions one render may run. Real templates need about 25 per message
/// (measured by the unit test `fuel_of_real_templates`, for a 50-message chat: Phi-3's 1,321,
/// SmolLM2's ChatML 1,163, a Llama-3-style one 1,359; for 400 messages about 10,800). This is
/// about 190x a 50-message chat, room for templates doing a few times more work per message
/// (a second pass over the messages, tool handling) over thousands of messages, more than a
/// context holds; a template looping without end stops within a fraction of a second.
pub const CHAT_TEMPLATE_FUEL: u64 = 250_000;

/// The chat template's name in its environment.
const CHAT: &str = "chat";

/// What a template is compiled from: its source and the special tokens it may print.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// A rendered prompt and the fuel it took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rendered {
    pub text: String,
    pub fuel: u64,
}

/// Why a render failed, before it becomes an [`super::EngineError::Template`].
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum RenderError {
    #[error("the template raised: {0}")]
    Raised(String),
    #[error("the template ran out of fuel: it took more than {CHAT_TEMPLATE_FUEL} steps to render {messages} message(s)")]
    OutOfFuel { messages: usize },
    #[error("the rendered prompt is longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("the rendered prompt is empty")]
    Empty,
    /// The child process rendering it died, hung, or could not be started.
    #[error("{0}")]
    Sandbox(String),
    #[error("{0}")]
    Failed(String),
}

/// Raised by the template itself (`raise_exception(...)`): it refuses the conversation, for
/// instance a system message in a template that has no place for one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

/// A compiled chat template, rendered in this process.
pub struct Template {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl Template {
    /// Compiles `spec.source` with the functions Hugging Face templates use and the fuel that
    /// bounds every render.
    ///
    /// # Errors
    /// minijinja's syntax error, as text.
    pub fn compile(spec: Spec) -> Result<Template, String> {
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.add_template_owned(CHAT, spec.source).map_err(|e| e.to_string())?;
        Ok(Template { env, bos_token: spec.bos_token, eos_token: spec.eos_token })
    }

    /// Renders `messages` with the generation prompt, refusing output past `limit` bytes.
    ///
    /// # Errors
    /// [`RenderError`] naming the bound the template crossed, or its own refusal.
    pub fn render(&self, messages: &[ChatMessage], limit: usize) -> Result<Rendered, RenderError> {
        let template = self.env.get_template(CHAT).map_err(|e| RenderError::Failed(e.to_string()))?;
        let mut out = Bounded { text: Vec::new(), limit, exceeded: false };
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let captured = template.render_captured_to(context, &mut out).map_err(|e| {
            if out.exceeded {
                RenderError::TooLong { limit }
            } else if e.kind() == minijinja::ErrorKind::OutOfFuel {
                RenderError::OutOfFuel { messages: messages.len() }
            } else if let Some(raised) = raised(&e) {
                RenderError::Raised(raised.0.clone())
            } else {
                RenderError::Failed(e.to_string())
            }
        })?;
        let fuel = captured.state().fuel_levels().map_or(0, |(consumed, _)| consumed);
        let text = String::from_utf8(out.text).map_err(|e| RenderError::Failed(e.to_string()))?;
        Ok(Rendered { text, fuel })
    }
}

/// The chat template of a loaded model, rendered where its memory can be bounded.
pub enum ChatTemplate {
    InProcess(Template),
    Sandboxed(sandbox::Sandbox),
}

impl ChatTemplate {
    /// Compiles the template (here, so that a syntax error fails the load at once) and, when
    /// this binary hosts sandboxes ([`sandbox::host`]), renders it in one from now on.
    ///
    /// # Errors
    /// minijinja's syntax error, as text.
    pub fn new(spec: Spec) -> Result<ChatTemplate, String> {
        match sandbox::hosted() {
            Some(settings) => {
                Template::compile(spec.clone())?;
                Ok(ChatTemplate::Sandboxed(sandbox::Sandbox::new(settings, spec)))
            }
            None => Template::compile(spec).map(ChatTemplate::InProcess),
        }
    }

    /// Renders `messages` within the bounds (see [`Template::render`]).
    ///
    /// # Errors
    /// [`RenderError`]; [`RenderError::Sandbox`] when the child rendering it died (a template
    /// past the memory limit), hung, or could not start.
    pub fn render(&self, messages: &[ChatMessage], limit: usize) -> Result<Rendered, RenderError> {
        match self {
            ChatTemplate::InProcess(t) => t.render(messages, limit),
            ChatTemplate::Sandboxed(s) => s.render(messages, limit),
        }
    }
}

/// Collects the rendered prompt and refuses to grow past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len().saturating_add(buf.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The template's own `raise_exception`, if that is what `e` comes from.
fn raised(e: &minijinja::Error) -> Option<&Raised> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Raised>() {
            return Some(r);
        }
        cause = c.source();
    }
    None
}
