//! Telemetry init: `tracing` to stderr as text or JSON lines.
//!
//! Every binary logs the same way; `RUST_LOG` overrides the default `info`.
//! Text carries ANSI colour only when stderr is a terminal: under systemd the
//! journal (or a file) would otherwise store the escape codes. JSON lines are
//! flat — `timestamp`, `level`, `target`, `message`, then the fields of the
//! current spans and of the event at the top level — so a log shipper can
//! filter on `machine` or `replication` without knowing the span tree.

use std::io::{IsTerminal, Write};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// Installs the global subscriber. Safe to call twice (the second is a no-op).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = match format {
        LogFormat::Text => {
            text(filter, std::io::stderr, std::io::stderr().is_terminal()).try_init()
        }
        LogFormat::Json => json(filter, std::io::stderr).try_init(),
    };
}

/// Text lines to `writer`, coloured only when `ansi`.
fn text<W>(filter: EnvFilter, writer: W, ansi: bool) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .finish()
}

/// Flat JSON lines to `writer`.
fn json<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(FlatJson { writer })
}

/// A span's fields, kept in its extensions until an event inside it is
/// written.
struct SpanFields(Map<String, Value>);

/// Writes one JSON object per event, span fields flattened in.
struct FlatJson<W> {
    writer: W,
}

impl<S, W> Layer<S> for FlatJson<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Fields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            // Root first, so an inner span's field wins over an outer one's.
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Fields(&mut line));
        let meta = event.metadata();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        line.insert("timestamp".into(), Value::String(now.to_string()));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        line.entry("message")
            .or_insert_with(|| Value::String(String::new()));
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        // Nowhere to report a failed log write; the line is lost.
        let _ = self.writer.make_writer().write_all(&bytes);
    }
}

/// Records fields into a JSON map, keeping numbers and booleans typed.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that keeps what was logged.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_something() {
        let span = tracing::info_span!("replication", machine = "web1", replication = "r-1");
        let _in = span.enter();
        let inner = tracing::info_span!("frame", seq = 42u64);
        let _in2 = inner.enter();
        tracing::warn!(bytes = 4096u64, "frame acknowledged late");
    }

    #[test]
    fn text_to_a_non_terminal_has_no_colour() {
        // What init picks for stderr that is a pipe, a file or the journal.
        let buf = Buffer::default();
        let sub = text(EnvFilter::new("info"), buf.clone(), false);
        tracing::subscriber::with_default(sub, log_something);
        let out = buf.text();
        assert!(out.contains("frame acknowledged late"), "{out}");
        assert!(out.contains("WARN"), "{out}");
        assert!(!out.contains('\x1b'), "escape codes in {out:?}");
    }

    #[test]
    fn text_to_a_terminal_is_coloured() {
        let buf = Buffer::default();
        let sub = text(EnvFilter::new("info"), buf.clone(), true);
        tracing::subscriber::with_default(sub, log_something);
        assert!(buf.text().contains('\x1b'), "{:?}", buf.text());
    }

    #[test]
    fn json_is_one_flat_object_per_line() {
        let buf = Buffer::default();
        let sub = json(EnvFilter::new("info"), buf.clone());
        tracing::subscriber::with_default(sub, || {
            log_something();
            tracing::info!("second line");
        });
        let out = buf.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["message"], "frame acknowledged late");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], module_path!());
        assert_eq!(v["machine"], "web1");
        assert_eq!(v["replication"], "r-1");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["bytes"], 4096);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
        // Flat: no nested span objects.
        assert!(
            v.as_object().unwrap().values().all(|f| !f.is_object()),
            "{v}"
        );
        let second: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["message"], "second line");
        assert!(second.get("machine").is_none(), "{second}");
    }

    #[test]
    fn a_span_field_recorded_later_is_logged() {
        let buf = Buffer::default();
        let sub = json(EnvFilter::new("info"), buf.clone());
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("job", job = tracing::field::Empty);
            span.record("job", "j-7");
            let _in = span.enter();
            tracing::info!("step done");
        });
        let v: Value = serde_json::from_str(buf.text().trim()).unwrap();
        assert_eq!(v["job"], "j-7");
    }
}
