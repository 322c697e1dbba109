//! The executor's generation endpoints, `POST /v1/completions` and
//! `/v1/chat/completions` on an LLM: the body read under the executor's limits, the
//! call checked (`llm::api`), the prompt built and tokenized, the sequence handed to
//! the model's engine, and its events written back whole or as Server-Sent Events.
//!
//! The first event is awaited before the response head is written, so a generation
//! that fails before its first token (its deadline passed in the queue, displaced by a
//! higher class, the model failed) gets its own status (504, 503, 500) rather than a
//! 200 with an error inside. A client that leaves drops the body and with it the
//! channel, which frees the sequence at the engine's next step.

use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

use crate::server::RequestBody;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::llm::api::{self, Answer, ApiError, Call, Kind, Prompt};
use super::llm::engine::{Engine, Event, GenError, Params};
use super::llm::sample::Sampling;
use super::llm::schedule::{Class, Refused};
use crate::error::{Body, json_response};
use crate::openai::error;

/// Generation defaults and limits the executor applies to every LLM it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmOptions {
    /// KV-cache budget, in tokens, per model (`--kv-cache-tokens`).
    pub kv_cache_tokens: usize,
    /// Sequences decoding at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Tokens per step, decodes and prefill chunks together (`--max-batch-tokens`).
    pub step_tokens: usize,
    /// `max_tokens` of a chat call that names none (capped by the context left).
    pub default_max_tokens: usize,
}

impl Default for LlmOptions {
    fn default() -> LlmOptions {
        LlmOptions {
            kv_cache_tokens: 32_768,
            max_num_seqs: 16,
            step_tokens: 128,
            default_max_tokens: 1024,
        }
    }
}

/// A completion's `max_tokens` when the call names none, as OpenAI's.
pub const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

pub fn api_error(e: &ApiError) -> Response<Body> {
    error(e.status, &e.message, e.param.as_deref(), e.code)
}

fn with_retry_after(mut r: Response<Body>) -> Response<Body> {
    let secs = super::llm::engine::RETRY_AFTER.as_secs().to_string();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs).expect("digits"),
    );
    r
}

/// The status and OpenAI error for a generation refused or failed before its first token.
fn gen_error(e: &GenError) -> Response<Body> {
    let msg = e.to_string();
    match e {
        GenError::Deadline => error(StatusCode::GATEWAY_TIMEOUT, &msg, None, "timeout"),
        GenError::Displaced | GenError::Stopped => with_retry_after(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &msg,
            None,
            "unavailable",
        )),
        GenError::Model => error(StatusCode::INTERNAL_SERVER_ERROR, &msg, None, "model_error"),
    }
}

/// The class a request asks for: `x-braid-priority` (critical, standard, sheddable),
/// else vLLM's `priority` field (below 0 critical, 0 standard, above 0 sheddable).
fn class(headers: &HeaderMap, call: &Call) -> Result<Class, ApiError> {
    if let Some(v) = headers.get("x-braid-priority") {
        let name = v.to_str().unwrap_or("").trim();
        return Class::parse(name).ok_or_else(|| {
            api::bad(
                "x-braid-priority",
                format!("unknown priority class {name:?}: use critical, standard or sheddable"),
            )
        });
    }
    Ok(match call.priority {
        Some(p) if p < 0 => Class::Critical,
        Some(p) if p > 0 => Class::Sheddable,
        _ => Class::Standard,
    })
}

/// `x-braid-timeout` (what braid's proxy sends: `250ms`, `3s`), as a deadline, read
/// by the proxy's own checked parser: a bad value is the caller's 400, never a panic.
fn deadline(headers: &HeaderMap, now: Instant) -> Result<Option<Instant>, ApiError> {
    let left = crate::headers::timeout(headers, crate::headers::LONGEST_CALLER_TIMEOUT)
        .map_err(|e| api::bad(crate::headers::TIMEOUT.as_str(), e))?;
    Ok(left.and_then(|d| now.checked_add(d)))
}

/// A seed for a call that names none: different per call, from the clock and a count.
fn fresh_seed() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = super::llm::sample::Rng::new(t ^ n.rotate_left(32));
    r.next_u64()
}

/// The prompt's tokens and the stop strings the template adds.
fn prompt_tokens(
    engine: &Engine,
    call: &Call,
) -> Result<(Vec<u32>, Option<&'static str>), ApiError> {
    let model = engine.model();
    let v = &model.vocab;
    Ok(match &call.prompt {
        Prompt::Text(t) => (v.encode(t), None),
        Prompt::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= v.len()) {
                return Err(api::bad(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {}", v.len()),
                ));
            }
            (ids.clone(), None)
        }
        Prompt::Messages(m) => {
            let piece = |id: Option<u32>| id.and_then(|i| v.piece(i)).unwrap_or("").to_string();
            let text = model
                .template
                .render(m, &piece(v.bos), &piece(v.eos))
                .map_err(|e| api::bad("messages", e))?;
            if model.template.is_transcript() {
                (v.encode(&text), Some(super::llm::chat::TRANSCRIPT_STOP))
            } else {
                // A Jinja template writes the BOS itself, as Hugging Face's do.
                let mut ids = Vec::new();
                v.encode_into(&text, &mut ids);
                (ids, None)
            }
        }
    })
}

/// Everything between a parsed call and the engine's first event.
pub async fn generate(
    engine: &Arc<Engine>,
    (name, default_temperature): (&str, Option<f32>),
    call: Call,
    headers: &HeaderMap,
    opts: &LlmOptions,
) -> Response<Body> {
    let model = engine.model().clone();
    let (prompt, params, call) = match plan(engine, default_temperature, call, headers, opts) {
        Ok(planned) => planned,
        Err(resp) => return *resp,
    };
    let param = prompt_param(&call);
    let mut rx = match engine.submit(prompt.clone(), params) {
        Ok(rx) => rx,
        Err(Refused::TooLarge { need, budget }) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "this request needs {need} tokens of KV cache; model {name} has {budget} in all"
                ),
                Some(param),
                "context_length_exceeded",
            );
        }
        Err(Refused::QueueFull) => {
            return with_retry_after(error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("model {name} is busy: its queue is full"),
                None,
                "queue_full",
            ));
        }
    };
    let id = format!(
        "{}-{:016x}",
        if call.kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        fresh_seed()
    );
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stream = call.stream;
    let mut answer = Answer::new(call, model, prompt.len(), id, created);
    let first = match rx.recv().await {
        Some(Event::Failed(e)) => return gen_error(&e),
        Some(ev) => ev,
        None => return gen_error(&GenError::Stopped),
    };
    let mut head = answer.start(&prompt).to_vec();
    head.extend_from_slice(&answer.event(first));
    if !stream {
        while !answer.done {
            match rx.recv().await {
                Some(ev) => {
                    answer.event(ev);
                }
                None => {
                    answer.event(Event::Failed(GenError::Stopped));
                }
            }
        }
        if answer.finish_reason().is_none() {
            return gen_error(&GenError::Model);
        }
        return json_response(StatusCode::OK, answer.whole().to_string());
    }
    let body = sse_body(Bytes::from(head), rx, answer);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The field a call's prompt is in, which errors about it name.
fn prompt_param(call: &Call) -> &'static str {
    match call.kind {
        Kind::Chat => "messages",
        Kind::Completion => "prompt",
    }
}

/// What the engine is asked for: the prompt's tokens and the generation's parameters
/// (its length within the context, its class, its deadline), or the answer refusing it.
fn plan(
    engine: &Arc<Engine>,
    default_temperature: Option<f32>,
    mut call: Call,
    headers: &HeaderMap,
    opts: &LlmOptions,
) -> Result<(Vec<u32>, Params, Call), Box<Response<Body>>> {
    let refused = |e: &ApiError| Box::new(api_error(e));
    let (prompt, template_stop) = prompt_tokens(engine, &call).map_err(|e| refused(&e))?;
    let param = prompt_param(&call);
    if prompt.is_empty() {
        return Err(refused(&api::bad(param, "the prompt is empty")));
    }
    let max_len = engine.model().max_len();
    let left = max_len.saturating_sub(prompt.len());
    let max_new = match (call.max_tokens, call.kind) {
        (Some(n), _) => n,
        (None, Kind::Completion) => COMPLETION_DEFAULT_MAX_TOKENS.min(left),
        (None, Kind::Chat) => opts.default_max_tokens.min(left),
    };
    if prompt.len() + max_new > max_len {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!(
                "this model's maximum context length is {max_len} tokens; this request asks for {} ({} in the prompt, {max_new} to generate)",
                prompt.len() + max_new,
                prompt.len()
            ),
            Some(param),
            "context_length_exceeded",
        )));
    }
    if max_new == 0 && !call.echo {
        return Err(refused(&api::bad(
            "max_tokens",
            "max_tokens 0 generates nothing (allowed only with echo)",
        )));
    }
    let class = class(headers, &call).map_err(|e| refused(&e))?;
    let deadline = deadline(headers, Instant::now()).map_err(|e| refused(&e))?;
    if let Some(s) = template_stop {
        call.stop.push(s.to_string());
    }
    let params = Params {
        sampling: Sampling {
            temperature: call.temperature.or(default_temperature).unwrap_or(1.0),
            top_k: call.top_k,
            top_p: call.top_p,
            seed: call.seed.unwrap_or_else(fresh_seed),
        },
        max_new,
        logprobs: call.logprobs,
        prompt_logprobs: call.echo && call.logprobs.is_some(),
        class,
        deadline,
    };
    Ok((prompt, params, call))
}

/// The rest of a stream: each event's chunk as it comes; the receiver is dropped (and
/// the sequence freed) as soon as the answer is over or the client goes.
fn sse_body(head: Bytes, rx: mpsc::UnboundedReceiver<Event>, answer: Answer) -> Body {
    type State = (Option<Bytes>, mpsc::UnboundedReceiver<Event>, Answer);
    let stream = futures_util::stream::unfold(
        Some((Some(head), rx, answer)),
        |st: Option<State>| async move {
            let (mut head, mut rx, mut answer) = st?;
            if let Some(b) = head.take().filter(|b| !b.is_empty()) {
                return Some((
                    Ok::<_, crate::error::BoxError>(Frame::data(b)),
                    Some((None, rx, answer)),
                ));
            }
            loop {
                if answer.done {
                    return None;
                }
                let ev = rx.recv().await.unwrap_or(Event::Failed(GenError::Stopped));
                let b = answer.event(ev);
                if !b.is_empty() {
                    return Some((
                        Ok::<_, crate::error::BoxError>(Frame::data(b)),
                        Some((None, rx, answer)),
                    ));
                }
            }
        },
    );
    http_body_util::StreamBody::new(stream).boxed()
}

/// Reads and parses the call; its model is looked up by the caller.
pub async fn read_call(
    req: Request<RequestBody>,
    kind: Kind,
    rules: crate::server::BodyRules<'static>,
) -> Result<(Call, HeaderMap), Response<Body>> {
    let (parts, body) = req.into_parts();
    let body = crate::server::read_body(&parts.headers, body, rules)
        .await
        .map_err(|e| error(e.status(), &e.to_string(), None, e.label()))?;
    let call = api::parse(kind, &body).map_err(|e| api_error(&e))?;
    Ok((call, parts.headers))
}
