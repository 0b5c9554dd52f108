//! The OpenAI wire format: request bodies in, completions and stream chunks out.
//!
//! Requests are checked here, before they reach the queue, so a bad request costs no
//! engine time. Unknown fields are refused (a misspelt `max_token` would otherwise be
//! silently ignored); fields OpenAI defines but edgeflow cannot honour (`n` > 1, `logprobs`,
//! penalties) are refused with a message naming them. `top_k`, `repetition_penalty` and
//! `ignore_eos` are accepted as extensions, spelt as vLLM spells them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::active::Prompt;
use crate::engine::{ChatMessage, FinishReason, GenaiConfig, GenerateParams, SamplingParams};

/// OpenAI allows up to four stop sequences.
const MAX_STOPS: usize = 4;
/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// The body of `/v1/chat/completions` and `/v1/completions` (one struct so the shared
/// fields are parsed and checked once; fields of the other endpoint are refused by
/// [`Request::into_plan`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Required, as by OpenAI; any value is served by the active model, whose id the
    /// response carries.
    pub model: String,
    // chat
    messages: Option<Vec<Message>>,
    max_completion_tokens: Option<u64>,
    // completions
    prompt: Option<Value>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u32>,
    // both
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[allow(dead_code)]
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<Value>,
    top_logprobs: Option<u32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    // extensions
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A checked request, independent of the model that will run it.
#[derive(Debug)]
pub struct Plan {
    pub endpoint: Endpoint,
    pub prompt: Prompt,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Vec<String>,
    ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

fn unsupported(param: &str, what: &str) -> ApiError {
    bad(format!("`{param}` {what} is not supported by this server"), param)
}

impl Request {
    /// Parses a request body, naming the offending field in the error.
    ///
    /// # Errors
    /// [`ApiError::InvalidRequest`] for malformed JSON, wrong types and unknown fields.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            let message = if inner.is_syntax() || inner.is_eof() {
                format!("the request body is not valid JSON: {inner}")
            } else if !is_object {
                return ApiError::invalid("the request body must be a JSON object", None);
            } else if path == "." || path == "?" {
                format!("invalid request body: {inner}")
            } else {
                format!("invalid request body: `{path}`: {inner}")
            };
            // `?` is where the syntax broke before any field was recognised.
            let param = if path == "." || path == "?" { None } else { Some(path.as_str()) };
            ApiError::invalid(message, param)
        })
    }

    /// Checks the request against `endpoint` and the server's limits.
    ///
    /// # Errors
    /// [`ApiError::InvalidRequest`] naming the first field at fault.
    pub fn into_plan(self, endpoint: Endpoint, max_tokens_limit: usize) -> Result<Plan, ApiError> {
        let wrong_endpoint = |field: &str| bad(format!("`{field}` is not a field of {}", endpoint.path()), field);
        let prompt = match endpoint {
            Endpoint::Chat => {
                if self.prompt.is_some() {
                    return Err(wrong_endpoint("prompt"));
                }
                for (field, present) in [("echo", self.echo.is_some()), ("suffix", self.suffix.is_some()), ("best_of", self.best_of.is_some())] {
                    if present {
                        return Err(wrong_endpoint(field));
                    }
                }
                let messages = self.messages.ok_or_else(|| bad("`messages` is required", "messages"))?;
                Prompt::Chat(chat_messages(messages)?)
            }
            Endpoint::Completions => {
                if self.messages.is_some() {
                    return Err(wrong_endpoint("messages"));
                }
                if self.max_completion_tokens.is_some() {
                    return Err(wrong_endpoint("max_completion_tokens"));
                }
                if self.echo == Some(true) {
                    return Err(unsupported("echo", "= true"));
                }
                if self.suffix.is_some() {
                    return Err(unsupported("suffix", "(insertion)"));
                }
                if self.best_of.is_some_and(|b| b != 1) {
                    return Err(unsupported("best_of", "other than 1"));
                }
                completion_prompt(self.prompt.ok_or_else(|| bad("`prompt` is required", "prompt"))?)?
            }
        };
        if let Some(n) = self.n {
            if n != 1 {
                return Err(bad(format!("`n` = {n}: only one choice per request is supported"), "n"));
            }
        }
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(unsupported(name, "other than 0 (use `repetition_penalty`)"));
            }
        }
        match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Number(n)) if n.as_u64() == Some(0) && endpoint == Endpoint::Completions => {}
            Some(_) => return Err(unsupported("logprobs", "")),
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(unsupported("top_logprobs", ""));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias", ""));
        }
        let (max_tokens, max_param) = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => return Err(bad("`max_tokens` and `max_completion_tokens` disagree", "max_tokens")),
            (Some(a), _) => (Some(a), "max_tokens"),
            (None, Some(b)) => (Some(b), "max_completion_tokens"),
            (None, None) => (None, "max_tokens"),
        };
        let max_tokens = match max_tokens {
            Some(0) => return Err(bad(format!("`{max_param}` must be at least 1"), max_param)),
            Some(m) if m > max_tokens_limit as u64 => return Err(bad(format!("`{max_param}` = {m} exceeds this server's limit of {max_tokens_limit}"), max_param)),
            Some(m) => Some(m as usize),
            None if endpoint == Endpoint::Completions => Some(COMPLETIONS_DEFAULT_MAX_TOKENS.min(max_tokens_limit)),
            None => None,
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = match self.stream_options {
            Some(_) if !stream => return Err(bad("`stream_options` is only allowed with `stream: true`", "stream_options")),
            Some(o) => o.include_usage,
            None => false,
        };
        Ok(Plan {
            endpoint,
            prompt,
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            // OpenAI seeds are signed 64-bit; reinterpreting keeps every seed distinct.
            seed: self.seed.map(|s| s as u64),
            stop: stops(self.stop)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stream,
            include_usage,
        })
    }
}

impl Plan {
    /// Generation parameters: the request's, else the model's `genai_config.json` defaults.
    /// Decoding is greedy unless the request sets a sampling parameter or the model's
    /// config says `do_sample` (the same rule as `edgeflow generate`).
    ///
    /// # Errors
    /// [`ApiError::InvalidRequest`] for out-of-range sampling parameters.
    pub fn params(&self, model: &GenaiConfig, max_tokens_limit: usize) -> Result<GenerateParams, ApiError> {
        let search = &model.search;
        let explicit_greedy = self.temperature == Some(0.0);
        let wants_sampling = self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some() || self.seed.is_some();
        let repetition_penalty = self.repetition_penalty.unwrap_or(search.repetition_penalty);
        let sampling = if explicit_greedy || (!wants_sampling && !search.do_sample) {
            SamplingParams { repetition_penalty, ..SamplingParams::greedy() }
        } else {
            SamplingParams {
                temperature: self.temperature.unwrap_or(if search.do_sample { search.temperature } else { 1.0 }),
                top_k: self.top_k.unwrap_or(if search.do_sample { search.top_k } else { 0 }),
                top_p: self.top_p.unwrap_or(if search.do_sample { search.top_p } else { 1.0 }),
                repetition_penalty,
                seed: self.seed,
            }
        };
        sampling.validate().map_err(|e| match e {
            crate::engine::EngineError::InvalidParameter { name, message } => bad(format!("`{name}`: {message}"), name),
            other => bad(other.to_string(), "temperature"),
        })?;
        // Unset max_tokens means "up to the context", bounded by the server's limit.
        let max_new_tokens = self.max_tokens.unwrap_or(max_tokens_limit);
        Ok(GenerateParams { max_new_tokens, sampling, stop: self.stop.clone(), record_top_logits: 0, ignore_eos: self.ignore_eos, collect_stats: false })
    }
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(bad("`messages` must contain at least one message", "messages"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => return Err(bad(format!("messages[{i}].role: `{other}` is not supported (system, developer, user, assistant)"), &format!("messages[{i}].role"))),
            };
            let content = match m.content {
                Value::String(s) => s,
                Value::Array(parts) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(
                                    format!("messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                                    &format!("messages[{i}].content"),
                                ))
                            }
                        }
                    }
                    text
                }
                Value::Null if role == "assistant" => String::new(),
                _ => return Err(bad(format!("messages[{i}].content: expected a string or an array of text parts"), &format!("messages[{i}].content"))),
            };
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

fn completion_prompt(prompt: Value) -> Result<Prompt, ApiError> {
    let expected = "`prompt`: expected a string, an array of one string, or an array of token ids";
    let ids = |items: &[Value]| -> Option<Vec<u32>> { items.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect() };
    match prompt {
        Value::String(s) => Ok(Prompt::Text(s)),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => ids(inner).map(Prompt::Ids).ok_or_else(|| bad(expected, "prompt")),
            [Value::String(_) | Value::Array(_), _, ..] => Err(bad("`prompt`: only one prompt per request is supported", "prompt")),
            [] => Err(bad("`prompt` is empty", "prompt")),
            _ => ids(&items).map(Prompt::Ids).ok_or_else(|| bad(expected, "prompt")),
        },
        _ => Err(bad(expected, "prompt")),
    }
}

fn stops(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let expected = "`stop`: expected a string or an array of up to 4 strings";
    let stops = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items.into_iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| bad(expected, "stop"))?,
        Some(_) => return Err(bad(expected, "stop")),
    };
    if stops.len() > MAX_STOPS {
        return Err(bad(expected, "stop"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("`stop`: stop sequences must not be empty", "stop"));
    }
    Ok(stops)
}

// ---- responses ----

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt: `cached_tokens` were reused from an earlier request's
/// keys and values (prefix reuse), not computed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens, prompt_tokens_details: PromptTokensDetails { cached_tokens } }
    }
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        // Cancelled generations are never reported as finished; the caller answers with
        // an error instead. "length" is the closest OpenAI value should one slip through.
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// Fields every response and chunk of one request shares.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `name@version` of the model version that served the request.
    pub system_fingerprint: String,
}

#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    #[serde(flatten)]
    pub header: &'a Header,
    pub object: &'static str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Serialize)]
pub struct Completion<'a> {
    #[serde(flatten)]
    pub header: &'a Header,
    pub object: &'static str,
    pub choices: [CompletionChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Serialize)]
pub struct CompletionChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// One SSE chunk of either endpoint.
#[derive(Serialize)]
pub struct Chunk<'a> {
    #[serde(flatten)]
    pub header: &'a Header,
    pub object: &'static str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// Present (as `null` until the last chunk) only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum ChunkChoice<'a> {
    Chat { index: u32, delta: Delta<'a>, logprobs: Option<()>, finish_reason: Option<&'static str> },
    Text { text: &'a str, index: u32, logprobs: Option<()>, finish_reason: Option<&'static str> },
}

#[derive(Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

impl Endpoint {
    /// The request field that holds the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        }
    }

    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }

    /// A chunk carrying `text` (and, on the last one, the finish reason).
    pub fn chunk_choice<'a>(self, text: &'a str, role: bool, finish: Option<&'static str>) -> ChunkChoice<'a> {
        match self {
            Endpoint::Chat => ChunkChoice::Chat {
                index: 0,
                delta: Delta { role: role.then_some("assistant"), content: if finish.is_some() && text.is_empty() { None } else { Some(text) } },
                logprobs: None,
                finish_reason: finish,
            },
            Endpoint::Completions => ChunkChoice::Text { text, index: 0, logprobs: None, finish_reason: finish },
        }
    }
}

#[derive(Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub version: String,
    pub digest: Option<String>,
    pub context_length: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(endpoint: Endpoint, body: &str) -> Result<Plan, ApiError> {
        Request::from_json(body.as_bytes())?.into_plan(endpoint, 512)
    }

    fn message(err: ApiError) -> (String, Option<String>) {
        let v = serde_json::to_value(err.body()).unwrap();
        (v["error"]["message"].as_str().unwrap().to_string(), v["error"]["param"].as_str().map(str::to_string))
    }

    #[test]
    fn chat_requests_become_plans() {
        let p = plan(Endpoint::Chat, r#"{"model":"x","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]}],"max_tokens":7,"stop":"END","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        match &p.prompt {
            Prompt::Chat(m) => {
                assert_eq!(m[0], ChatMessage { role: "system".into(), content: "be brief".into() });
                assert_eq!(m[1].content, "Hi!");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((p.max_tokens, p.stop.clone(), p.stream, p.include_usage), (Some(7), vec!["END".to_string()], true, true));
    }

    #[test]
    fn completion_prompts_in_every_openai_shape() {
        let cases = [(r#""Once""#, "text"), (r#"["Once"]"#, "text"), ("[1, 2, 3]", "ids"), ("[[1, 2]]", "ids")];
        for (prompt, kind) in cases {
            let p = plan(Endpoint::Completions, &format!(r#"{{"model":"x","prompt":{prompt}}}"#)).unwrap();
            assert_eq!(p.max_tokens, Some(16), "OpenAI's default for completions");
            match (&p.prompt, kind) {
                (Prompt::Text(t), "text") => assert_eq!(t, "Once"),
                (Prompt::Ids(ids), "ids") => assert!(!ids.is_empty()),
                (other, _) => panic!("{prompt}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: &[(Endpoint, &str, &str, Option<&str>)] = &[
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"n":2}"#, "only one choice", Some("n")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}"#, "invalid type", Some("max_tokens")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"max_token":5}"#, "unknown field `max_token`", Some("max_token")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#, "at least 1", Some("max_tokens")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"max_tokens":100000}"#, "limit of 512", Some("max_tokens")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"tool","content":"hi"}]}"#, "not supported", Some("messages[0].role")),
            (Endpoint::Chat, r#"{"model":"x","messages":[]}"#, "at least one message", Some("messages")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":5}]}"#, "expected a string", Some("messages[0].content")),
            (Endpoint::Chat, r#"{"model":"x","prompt":"hi","messages":[]}"#, "not a field of /v1/chat/completions", Some("prompt")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"hi"}]}"#, "missing field `model`", None),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#, "up to 4", Some("stop")),
            (Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"logprobs":true}"#, "not supported", Some("logprobs")),
            (
                Endpoint::Chat,
                r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
                "only allowed with `stream: true`",
                Some("stream_options"),
            ),
            (Endpoint::Completions, r#"{"model":"x","prompt":["a","b"]}"#, "only one prompt", Some("prompt")),
            (Endpoint::Completions, r#"{"model":"x","prompt":[1,-2]}"#, "token ids", Some("prompt")),
            (Endpoint::Completions, r#"{"model":"x","prompt":"a","echo":true}"#, "not supported", Some("echo")),
            (Endpoint::Completions, r#"{"model":"x","prompt":"a","frequency_penalty":0.5}"#, "repetition_penalty", Some("frequency_penalty")),
            (Endpoint::Completions, r#"{"model":"x","prompt":"a""#, "not valid JSON", None),
            (Endpoint::Completions, "[1,2]", "must be a JSON object", None),
        ];
        for (endpoint, body, needle, param) in cases {
            let err = plan(*endpoint, body).expect_err(body);
            assert_eq!(err.status().as_u16(), 400, "{body}");
            let (msg, p) = message(err);
            assert!(msg.contains(needle), "{body}: {msg}");
            assert_eq!(p.as_deref(), *param, "{body}: {msg}");
        }
    }

    #[test]
    fn invalid_utf8_is_a_bad_request() {
        let err = Request::from_json(b"{\"model\":\"x\",\"prompt\":\"\xff\xfe\"}").unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
    }

    #[test]
    fn sampling_follows_the_request_then_the_model() {
        let config: GenaiConfig = serde_json::from_str(
            r#"{"model":{"context_length":64,"vocab_size":10,"eos_token_id":2,"decoder":{"filename":"m.onnx","head_size":4,"hidden_size":8,"num_attention_heads":2,"num_hidden_layers":1,"num_key_value_heads":2}},"search":{"do_sample":false}}"#,
        )
        .unwrap();
        let greedy = plan(Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#).unwrap().params(&config, 512).unwrap();
        assert!(greedy.sampling.is_greedy());
        assert_eq!(greedy.max_new_tokens, 512, "unset max_tokens: up to the server limit");
        let sampled =
            plan(Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"temperature":0.7,"top_p":0.9,"seed":-1}"#).unwrap().params(&config, 512).unwrap();
        assert_eq!((sampled.sampling.temperature, sampled.sampling.top_p, sampled.sampling.seed), (0.7, 0.9, Some(u64::MAX)));
        let zero = plan(Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"temperature":0,"seed":3}"#).unwrap().params(&config, 512).unwrap();
        assert!(zero.sampling.is_greedy(), "temperature 0 is greedy whatever else is set");
        let err = plan(Endpoint::Chat, r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"top_p":1.5}"#).unwrap().params(&config, 512).unwrap_err();
        assert_eq!(message(err).1.as_deref(), Some("top_p"));
    }

    #[test]
    fn chunks_have_the_openai_shape() {
        let header = Header { id: "chatcmpl-1".into(), created: 1, model: "m".into(), system_fingerprint: "m@1".into() };
        let first = serde_json::to_value(Chunk { header: &header, object: "chat.completion.chunk", choices: vec![Endpoint::Chat.chunk_choice("", true, None)], usage: Some(None) })
            .unwrap();
        assert_eq!(first["choices"][0]["delta"], serde_json::json!({"role": "assistant", "content": ""}));
        assert_eq!(first["usage"], Value::Null);
        assert_eq!(first["id"], "chatcmpl-1");
        let last =
            serde_json::to_value(Chunk { header: &header, object: "chat.completion.chunk", choices: vec![Endpoint::Chat.chunk_choice("", false, Some("stop"))], usage: None })
                .unwrap();
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last.get("usage").is_none());
        let text =
            serde_json::to_value(Chunk { header: &header, object: "text_completion", choices: vec![Endpoint::Completions.chunk_choice("hi", false, None)], usage: None }).unwrap();
        assert_eq!(text["choices"][0]["text"], "hi");
    }
}
