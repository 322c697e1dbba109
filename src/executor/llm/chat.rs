//! Chat messages to a prompt: the GGUF's own `tokenizer.chat_template` (Jinja, as
//! Hugging Face's `apply_chat_template` renders it: `messages`, `bos_token`,
//! `eos_token`, `add_generation_prompt`, `raise_exception`, Python's string methods),
//! or, for a base model that has none, a plain transcript:
//!
//! ```text
//! {system}
//!
//! User: {user}
//! Assistant: {assistant}
//! User: {user}
//! Assistant:
//! ```
//!
//! whose generations also stop at a new `User:` line, so a base model does not go on
//! to write the user's next turn.

use minijinja::{Environment, Error, ErrorKind, context};

/// One message, its content already text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub enum Template {
    Jinja(Box<Environment<'static>>),
    Transcript,
}

/// Where the transcript's generations stop.
pub const TRANSCRIPT_STOP: &str = "\nUser:";

impl Template {
    /// The GGUF's template, compiled once; `None` gives the transcript.
    pub fn new(source: Option<String>) -> Result<Template, String> {
        let Some(source) = source else {
            return Ok(Template::Transcript);
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("tokenizer.chat_template does not compile: {e}"))?;
        Ok(Template::Jinja(Box::new(env)))
    }

    pub fn is_transcript(&self) -> bool {
        matches!(self, Template::Transcript)
    }

    /// The prompt for `messages`, ending where the assistant's answer begins. An error
    /// is the template's own (`raise_exception`), for a 400.
    pub fn render(&self, messages: &[Message], bos: &str, eos: &str) -> Result<String, String> {
        match self {
            Template::Jinja(env) => {
                let t = env.get_template("chat").map_err(|e| e.to_string())?;
                t.render(context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    bos_token => bos,
                    eos_token => eos,
                    add_generation_prompt => true,
                })
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                    _ => format!("the chat template failed: {e}"),
                })
            }
            Template::Transcript => {
                let mut out = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" | "developer" => {
                            out.push_str(&m.content);
                            out.push_str("\n\n");
                        }
                        "user" => {
                            out.push_str("User: ");
                            out.push_str(&m.content);
                            out.push('\n');
                        }
                        "assistant" => {
                            out.push_str("Assistant: ");
                            out.push_str(&m.content);
                            out.push('\n');
                        }
                        other => return Err(format!("unknown message role {other:?}")),
                    }
                }
                out.push_str("Assistant:");
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        [
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Why?"),
        ]
        .iter()
        .map(|(r, c)| Message {
            role: r.to_string(),
            content: c.to_string(),
        })
        .collect()
    }

    #[test]
    fn transcript_for_base_models() {
        let t = Template::new(None).unwrap();
        assert_eq!(
            t.render(&msgs(), "<bos>", "<eos>").unwrap(),
            "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Why?\nAssistant:"
        );
    }

    #[test]
    fn a_gguf_template_with_python_methods_and_raise_exception() {
        // The shape of Gemma's instruction template.
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\
            <start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}\
            {% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
        let t = Template::new(Some(src.into())).unwrap();
        let out = t.render(&msgs()[1..3], "<bos>", "<eos>").unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>model\n"
        );
        let tool = [Message {
            role: "tool".into(),
            content: "x".into(),
        }];
        assert_eq!(t.render(&tool, "", "").unwrap_err(), "no tools");
        let py = Template::new(Some("{{ messages[0].content.strip().upper() }}".into())).unwrap();
        let m = [Message {
            role: "user".into(),
            content: "  hi ".into(),
        }];
        assert_eq!(py.render(&m, "", "").unwrap(), "HI");
        assert!(Template::new(Some("{% for %}".into())).is_err());
    }
}
