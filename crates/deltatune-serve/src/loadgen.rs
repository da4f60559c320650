//! A load generator for a running server: concurrent clients (a thread each, keep-alive
//! connections) sending requests spread over several models for a bounded time and count,
//! loopback only. Every request carries an id the server echoes, so lost, duplicated or
//! crossed answers are counted, not assumed away.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A minimal HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
}

/// The address of `url` (`http://host:port`), refused unless it is a loopback address.
pub fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: give an http://host:port address"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("`{url}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{url}` resolves to no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "`{url}` is not a loopback address: the load generator only loads this machine's servers"
        ));
    }
    Ok(addr)
}

impl Conn {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            stream: None,
            timeout,
        }
    }

    /// Sends one request and reads its answer (reconnecting once if a kept-alive connection
    /// was closed).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let reused = self.stream.is_some();
        match self.try_request(method, path, headers, body) {
            Ok(a) => Ok(a),
            Err(_) if reused => {
                self.stream = None;
                self.try_request(method, path, headers, body)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
            self.stream = Some(BufReader::new(s));
        }
        let r = self.stream.as_mut().expect("connected");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = r.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the server closed the connection"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("a malformed status line"))?;
        let mut hs = BTreeMap::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                hs.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut body = Vec::new();
        if hs
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("a bad chunk"))?;
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = hs
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
            self.stream = None;
        }
        if hs
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.stream = None;
        }
        Ok(Answer {
            status,
            headers: hs,
            body,
        })
    }
}

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Classify,
}

/// A load run's settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `(model, server url)`: each request picks the next model (per client, round robin) and
    /// goes to its server (one server for all, or one process per adapter).
    pub targets: Vec<(String, String)>,
    pub endpoint: Endpoint,
    pub clients: usize,
    pub duration: Duration,
    /// Requests in all at most.
    pub max_requests: usize,
    /// Completion tokens per request (completions).
    pub max_tokens: usize,
    /// Texts to send (cycled).
    pub texts: Vec<String>,
    pub timeout: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    /// Requests with no answer (connection failures, timeouts).
    pub lost: usize,
    /// Answers carrying an id already answered, or another request's id.
    pub duplicated: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub completion_tokens: usize,
    /// Answered requests per model.
    pub per_model: BTreeMap<String, usize>,
    /// The first few error answers.
    pub error_samples: Vec<String>,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    seen: HashSet<String>,
    report: LoadReport,
}

/// Runs the load and reports it.
pub fn run(opts: &LoadOptions) -> Result<LoadReport, String> {
    if opts.targets.is_empty() {
        return Err("give at least one model to load".into());
    }
    if opts.texts.is_empty() {
        return Err("give at least one text to send".into());
    }
    let targets: Vec<(String, SocketAddr)> = opts
        .targets
        .iter()
        .map(|(m, u)| Ok((m.clone(), loopback_addr(u)?)))
        .collect::<Result<_, String>>()?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + opts.duration;
    std::thread::scope(|scope| {
        for c in 0..opts.clients.max(1) {
            let (targets, tally, sent) = (&targets, tally.clone(), sent.clone());
            scope.spawn(move || {
                let mut conns: BTreeMap<SocketAddr, Conn> = BTreeMap::new();
                let mut k = 0usize;
                while Instant::now() < deadline {
                    let n = sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= opts.max_requests {
                        break;
                    }
                    let (model, addr) = &targets[(c + k) % targets.len()];
                    let text = &opts.texts[(c * 7 + k) % opts.texts.len()];
                    k += 1;
                    let id = format!("lg-{c}-{k}");
                    let (path, body) = match opts.endpoint {
                        Endpoint::Completions => (
                            "/v1/completions",
                            json!({"model": model, "prompt": text, "max_tokens": opts.max_tokens,
                                   "temperature": 0}),
                        ),
                        Endpoint::Classify => {
                            ("/v1/classify", json!({"model": model, "inputs": [text]}))
                        }
                    };
                    let conn = conns
                        .entry(*addr)
                        .or_insert_with(|| Conn::new(*addr, opts.timeout));
                    let t = Instant::now();
                    let r = conn.request(
                        "POST",
                        path,
                        &[("Content-Type", "application/json"), ("x-request-id", &id)],
                        body.to_string().as_bytes(),
                    );
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let mut g = tally.lock().unwrap();
                    g.report.requests += 1;
                    match r {
                        Err(e) => {
                            g.report.lost += 1;
                            if g.report.error_samples.len() < 5 {
                                g.report.error_samples.push(format!("{id}: {e}"));
                            }
                        }
                        Ok(a) => {
                            let echoed = a.headers.get("x-request-id").cloned().unwrap_or_default();
                            if echoed != id || !g.seen.insert(echoed) {
                                g.report.duplicated += 1;
                            }
                            if a.status == 200 {
                                g.report.ok += 1;
                                g.latencies.push(ms);
                                *g.report.per_model.entry(model.clone()).or_default() += 1;
                                g.report.completion_tokens +=
                                    a.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0)
                                        as usize;
                            } else {
                                g.report.errors += 1;
                                if g.report.error_samples.len() < 5 {
                                    g.report.error_samples.push(format!(
                                        "{id}: {} {}",
                                        a.status,
                                        a.text()
                                    ));
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    let mut g = Arc::try_unwrap(tally)
        .map_err(|_| "threads still hold the tally")?
        .into_inner()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    g.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if g.latencies.is_empty() {
            return 0.0;
        }
        let i = ((g.latencies.len() as f64 - 1.0) * p).round() as usize;
        g.latencies[i]
    };
    g.report.seconds = secs;
    g.report.requests_per_s = g.report.ok as f64 / secs;
    g.report.tokens_per_s = g.report.completion_tokens as f64 / secs;
    g.report.p50_ms = pct(0.5);
    g.report.p99_ms = pct(0.99);
    Ok(g.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_addresses_off_this_machine() {
        assert!(loopback_addr("http://127.0.0.1:9").is_ok());
        assert!(loopback_addr("http://[::1]:9").is_ok());
        let e = loopback_addr("http://10.1.2.3:80").unwrap_err();
        assert!(e.contains("not a loopback"), "{e}");
        assert!(loopback_addr("https://127.0.0.1:9").is_err());
    }
}
