//! Counters and histograms of a server, written in Prometheus' text format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size histogram's buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (endpoint, model, status) -> count
    requests: BTreeMap<(String, String, u16), u64>,
    /// (endpoint, model) -> latency
    latency: BTreeMap<(String, String), Histogram>,
    /// model -> tokens
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    /// engine -> rows per pass
    batch: BTreeMap<String, Histogram>,
    queue: BTreeMap<String, i64>,
    adapters: i64,
}

/// A server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Quotes a label value for the text format.
fn quote(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A finished request: its endpoint, model (adapter or base), HTTP status and duration.
    pub fn request(&self, endpoint: &str, model: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests
                .entry((endpoint.into(), model.into(), status))
                .or_default() += 1;
            m.latency
                .entry((endpoint.into(), model.into()))
                .or_default()
                .observe(&LATENCY_BUCKETS, seconds);
        });
    }

    pub fn tokens(&self, model: &str, prompt: usize, completion: usize) {
        self.with(|m| {
            *m.prompt_tokens.entry(model.into()).or_default() += prompt as u64;
            *m.completion_tokens.entry(model.into()).or_default() += completion as u64;
        });
    }

    /// One pass of an engine over `rows` batch rows.
    pub fn batch(&self, engine: &str, rows: usize) {
        self.with(|m| {
            m.batch
                .entry(engine.into())
                .or_default()
                .observe(&BATCH_BUCKETS, rows as f64)
        });
    }

    pub fn set_queue(&self, engine: &str, depth: usize) {
        self.with(|m| {
            m.queue.insert(engine.into(), depth as i64);
        });
    }

    pub fn set_adapters(&self, n: usize) {
        self.with(|m| m.adapters = n as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut o = String::new();
            o.push_str("# HELP deltatune_requests_total Requests answered, by endpoint, model and HTTP status.\n# TYPE deltatune_requests_total counter\n");
            for ((e, md, s), c) in &m.requests {
                let _ = writeln!(
                    o,
                    "deltatune_requests_total{{endpoint=\"{}\",model=\"{}\",status=\"{s}\"}} {c}",
                    quote(e),
                    quote(md)
                );
            }
            o.push_str("# HELP deltatune_request_duration_seconds Time from request to the last byte of the answer.\n# TYPE deltatune_request_duration_seconds histogram\n");
            for ((e, md), h) in &m.latency {
                let labels = format!("endpoint=\"{}\",model=\"{}\"", quote(e), quote(md));
                h.write(
                    &mut o,
                    "deltatune_request_duration_seconds",
                    &labels,
                    &LATENCY_BUCKETS,
                );
            }
            o.push_str("# HELP deltatune_prompt_tokens_total Prompt tokens read, by model.\n# TYPE deltatune_prompt_tokens_total counter\n");
            for (md, c) in &m.prompt_tokens {
                let _ = writeln!(o, "deltatune_prompt_tokens_total{{model=\"{}\"}} {c}", quote(md));
            }
            o.push_str("# HELP deltatune_completion_tokens_total Tokens generated, by model.\n# TYPE deltatune_completion_tokens_total counter\n");
            for (md, c) in &m.completion_tokens {
                let _ = writeln!(
                    o,
                    "deltatune_completion_tokens_total{{model=\"{}\"}} {c}",
                    quote(md)
                );
            }
            o.push_str("# HELP deltatune_batch_rows Rows in each pass through the base, by engine.\n# TYPE deltatune_batch_rows histogram\n");
            for (e, h) in &m.batch {
                h.write(
                    &mut o,
                    "deltatune_batch_rows",
                    &format!("engine=\"{}\"", quote(e)),
                    &BATCH_BUCKETS,
                );
            }
            o.push_str("# HELP deltatune_queue_depth Requests waiting for an engine.\n# TYPE deltatune_queue_depth gauge\n");
            for (e, d) in &m.queue {
                let _ = writeln!(o, "deltatune_queue_depth{{engine=\"{}\"}} {d}", quote(e));
            }
            o.push_str("# HELP deltatune_adapters_loaded Adapters loaded.\n# TYPE deltatune_adapters_loaded gauge\n");
            let _ = writeln!(o, "deltatune_adapters_loaded {}", m.adapters);
            o
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("completions", "a", 200, 0.02);
        m.request("completions", "a", 200, 0.2);
        m.request("completions", "b\"x", 404, 0.001);
        m.batch("decoder", 3);
        let t = m.render();
        assert!(t.contains(
            "deltatune_requests_total{endpoint=\"completions\",model=\"a\",status=\"200\"} 2"
        ));
        assert!(t.contains("model=\"b\\\"x\",status=\"404\"} 1"), "{t}");
        // Buckets are cumulative: 0.02 and 0.2 are both <= 0.25, only 0.02 <= 0.025.
        assert!(
            t.contains("endpoint=\"completions\",model=\"a\",le=\"0.025\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("endpoint=\"completions\",model=\"a\",le=\"0.25\"} 2"),
            "{t}"
        );
        assert!(t.contains("deltatune_batch_rows_bucket{engine=\"decoder\",le=\"2\"} 0"));
        assert!(t.contains("deltatune_batch_rows_bucket{engine=\"decoder\",le=\"4\"} 1"));
    }
}
