//! `deltatune-fuzz`: a seeded mutation fuzzer for every file loader of deltatune, on stable
//! Rust.
//!
//! ```text
//! deltatune-fuzz <target|all|list> [--cases N] [--seed S] [--timeout-ms T] [--start K]
//!                [--out DIR] [--input FILE]
//! ```
//!
//! Each target runs in a child process (so an abort, a stack overflow or the hard memory cap
//! is caught and its input kept). Inside it, every case is generated from `(seed, target,
//! case number)` alone, written to a file, and loaded on a worker thread under
//! `catch_unwind`, a watchdog (`--timeout-ms`, default 5000) and a counting allocator. A panic,
//! a hang or a heap peak over `max(64 MiB, 16 x input size)` fails the run; the input is saved
//! as `DIR/<target>-<case>.bin` (default DIR `target/fuzz-crashes`) and the command that
//! replays it is printed.

mod alloc;
mod gguf_mut;
mod mutate;
mod safetensors_mut;
mod targets;

// The CLI's settings resolver, from the library.
use deltatune::settings;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deltatune_core::Rng;

use targets::Target;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const MIB: usize = 1 << 20;

/// The heap a case may use: a loader reads the file (1x), candle copies the tensors (1x) and
/// converts them to f32 (up to 4x for 8-bit floats), plus parsing structures; 16x leaves
/// headroom for that and nothing for allocations sized by what a header merely claims. Small
/// inputs get 64 MiB: building a tokenizer or a model has a fixed cost independent of size.
fn soft_limit(input_len: usize) -> usize {
    (64 * MIB).max(16 * input_len)
}

/// Beyond this the allocation fails (the process aborts and the supervisor keeps the input):
/// it stops a runaway case before it takes the machine's memory.
fn hard_cap(input_len: usize) -> usize {
    (1024 * MIB).max(64 * input_len)
}

#[derive(Debug, Clone)]
struct Args {
    target: String,
    cases: u64,
    seed: u64,
    start: u64,
    timeout_ms: u64,
    out: PathBuf,
    input: Option<PathBuf>,
    child: bool,
}

fn usage() -> String {
    let names: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
    format!(
        "usage: deltatune-fuzz <target|all|list> [--cases N (default 1000)] [--seed S (default 1)] \
         [--timeout-ms T (default 5000)] [--start K (first case number, default 0)] \
         [--out DIR (default target/fuzz-crashes)] [--input FILE (run one saved input)]\n\
         targets: {}",
        names.join(", ")
    )
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        target: String::new(),
        cases: 1000,
        seed: 1,
        start: 0,
        timeout_ms: 5000,
        out: PathBuf::from("target/fuzz-crashes"),
        input: None,
        child: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{}", usage()))
        };
        let num = |name: &str, v: String| {
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a non-negative integer, got `{v}`"))
        };
        match arg.as_str() {
            "--cases" => a.cases = num("--cases", val("--cases")?)?,
            "--seed" => a.seed = num("--seed", val("--seed")?)?,
            "--start" => a.start = num("--start", val("--start")?)?,
            "--timeout-ms" => a.timeout_ms = num("--timeout-ms", val("--timeout-ms")?)?.max(1),
            "--out" => a.out = PathBuf::from(val("--out")?),
            "--input" => a.input = Some(PathBuf::from(val("--input")?)),
            "--child" => a.child = true,
            "-h" | "--help" => return Err(usage()),
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`\n{}", usage())),
            s if a.target.is_empty() => a.target = s.to_string(),
            s => return Err(format!("unexpected argument `{s}`\n{}", usage())),
        }
    }
    if a.target.is_empty() {
        return Err(usage());
    }
    Ok(a)
}

/// The input of case `case`: a function of the seed, the target and the case number only.
fn case_input(t: &Target, seeds: &targets::Seeds, seed: u64, case: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed).derive(t.name).derive(&case.to_string());
    let mut input = (t.mutate)(&mut rng, seeds);
    input.truncate(mutate::MAX_LEN);
    input
}

/// What one case did.
#[derive(Debug)]
enum Outcome {
    Ok,
    Error(String),
    Panic(String),
}

struct Done {
    outcome: Outcome,
    peak: usize,
    /// A panic the loader caught itself (it returned an error, but a panic happened).
    inner_panic: Option<String>,
}

static PANIC_MSG: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string();
        if let Ok(mut m) = PANIC_MSG.lock() {
            m.get_or_insert(msg);
        }
    }));
}

/// Runs one case (on the calling thread).
fn run_case(t: &Target, path: &Path, input_len: usize) -> Done {
    if let Ok(mut m) = PANIC_MSG.lock() {
        *m = None;
    }
    alloc::case_start(hard_cap(input_len));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(path)));
    let peak = alloc::case_peak();
    alloc::case_end();
    let recorded = PANIC_MSG.lock().ok().and_then(|mut m| m.take());
    match r {
        Ok(Ok(())) => Done {
            outcome: Outcome::Ok,
            peak,
            inner_panic: recorded,
        },
        Ok(Err(e)) => Done {
            outcome: Outcome::Error(e),
            peak,
            inner_panic: recorded,
        },
        Err(p) => {
            let text = recorded.unwrap_or_else(|| {
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into())
            });
            Done {
                outcome: Outcome::Panic(text),
                peak,
                inner_panic: None,
            }
        }
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Row {
    target: String,
    cases: u64,
    ok: u64,
    errors: u64,
    panics: u64,
    hangs: u64,
    over_memory: u64,
    /// Panics the loader caught and turned into an error itself.
    inner_panics: u64,
    aborts: u64,
    peak_heap: usize,
    /// The case with the largest heap peak relative to its input size.
    worst_ratio: f64,
    seconds: f64,
    peak_rss: u64,
}

fn work_dir(out: &Path, target: &str) -> PathBuf {
    out.join(".work").join(target)
}

fn save_crash(a: &Args, t: &Target, case: u64, input: &[u8], why: &str) -> PathBuf {
    save_input(a, t, case, input, why, "FAIL")
}

fn save_input(a: &Args, t: &Target, case: u64, input: &[u8], why: &str, label: &str) -> PathBuf {
    let p = a.out.join(format!("{}-{case}.bin", t.name));
    let _ = std::fs::create_dir_all(&a.out);
    let _ = std::fs::write(&p, input);
    let exe = std::env::current_exe()
        .map(|e| e.display().to_string())
        .unwrap_or_else(|_| "deltatune-fuzz".into());
    eprintln!(
        "\n{label} {} case {case}: {why}\n  input saved: {}\n  replay:      {exe} {} --input {}\n  regenerate:  {exe} {} --seed {} --start {case} --cases 1",
        t.name,
        p.display(),
        t.name,
        p.display(),
        t.name,
        a.seed
    );
    p
}

/// The child: runs `a.cases` cases of one target, writes its row to `.work/<target>/row.json`.
fn child(a: &Args, t: &Target) -> ExitCode {
    install_panic_hook();
    let seeds = match (t.seeds)() {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            eprintln!("{}: no seeds", t.name);
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{}: building the seeds: {e:#}", t.name);
            return ExitCode::from(2);
        }
    };
    let work = work_dir(&a.out, t.name);
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("creating {}: {e}", work.display());
        return ExitCode::from(2);
    }
    let case_path = work.join(t.file);
    let current = match std::fs::File::create(work.join("case")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("creating {}: {e}", work.join("case").display());
            return ExitCode::from(2);
        }
    };

    // The worker runs the cases; this thread is the watchdog.
    let (job_tx, job_rx) = mpsc::channel::<(PathBuf, usize)>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let target_idx = targets::all()
        .iter()
        .position(|x| x.name == t.name)
        .unwrap();
    std::thread::Builder::new()
        .name("case".into())
        // The main thread's stack size on Linux: a stack overflow here is one for users too.
        .stack_size(8 * MIB)
        .spawn(move || {
            let ts = targets::all();
            let t = &ts[target_idx];
            while let Ok((p, len)) = job_rx.recv() {
                if done_tx.send(run_case(t, &p, len)).is_err() {
                    break;
                }
            }
        })
        .expect("spawning the worker thread");

    let mut row = Row {
        target: t.name.to_string(),
        ..Row::default()
    };
    let started = Instant::now();
    let timeout = Duration::from_millis(a.timeout_ms);
    let mut failures = 0u64;
    let mut first_inner = None;
    let progress_every = (a.cases / 10).max(1);
    for case in a.start..a.start + a.cases {
        let input = case_input(t, &seeds, a.seed, case);
        if let Err(e) = std::fs::write(&case_path, &input) {
            eprintln!("writing {}: {e}", case_path.display());
            return ExitCode::from(2);
        }
        let _ = current.write_at(&case.to_le_bytes(), 0);
        job_tx
            .send((case_path.clone(), input.len()))
            .expect("worker alive");
        let done = match done_rx.recv_timeout(timeout) {
            Ok(d) => d,
            Err(_) => {
                row.hangs += 1;
                row.cases += 1;
                save_crash(
                    a,
                    t,
                    case,
                    &input,
                    &format!("no result after {} ms (hang)", a.timeout_ms),
                );
                row.seconds = started.elapsed().as_secs_f64();
                row.peak_rss = alloc::peak_rss().unwrap_or(0);
                row.peak_heap = row.peak_heap.max(alloc::process_peak());
                write_row(&work, &row);
                // The worker is stuck; leave without waiting for it.
                let _ = std::io::stderr().flush();
                std::process::exit(1);
            }
        };
        row.cases += 1;
        row.peak_heap = row.peak_heap.max(done.peak);
        row.worst_ratio = row
            .worst_ratio
            .max(done.peak as f64 / input.len().max(1) as f64);
        if let Some(p) = &done.inner_panic {
            row.inner_panics += 1;
            if first_inner.is_none() {
                first_inner = Some(p.clone());
                save_input(
                    a,
                    t,
                    case,
                    &input,
                    &format!(
                        "(not a failure) the loader caught a panic and returned an error: {p}"
                    ),
                    "NOTE",
                );
            }
        }
        let limit = soft_limit(input.len());
        if done.peak > limit {
            row.over_memory += 1;
            failures += 1;
            if failures <= 10 {
                save_crash(
                    a,
                    t,
                    case,
                    &input,
                    &format!(
                        "heap peak {:.1} MiB over the limit {:.1} MiB (input {} bytes)",
                        done.peak as f64 / MIB as f64,
                        limit as f64 / MIB as f64,
                        input.len()
                    ),
                );
            }
        }
        match done.outcome {
            Outcome::Ok => row.ok += 1,
            Outcome::Error(e) => {
                row.errors += 1;
                if e.trim().is_empty() {
                    failures += 1;
                    save_crash(a, t, case, &input, "an error with an empty message");
                }
            }
            Outcome::Panic(msg) => {
                row.panics += 1;
                failures += 1;
                if failures <= 10 {
                    save_crash(a, t, case, &input, &format!("panic: {msg}"));
                }
            }
        }
        let n = case - a.start + 1;
        if n.is_multiple_of(progress_every) && a.cases >= 1000 {
            eprintln!(
                "  {} {n}/{} cases, {:.0}/s, {} failures",
                t.name,
                a.cases,
                n as f64 / started.elapsed().as_secs_f64(),
                failures
            );
        }
    }
    row.seconds = started.elapsed().as_secs_f64();
    row.peak_rss = alloc::peak_rss().unwrap_or(0);
    write_row(&work, &row);
    if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn write_row(work: &Path, row: &Row) {
    let _ = std::fs::write(
        work.join("row.json"),
        serde_json::to_vec(row).unwrap_or_default(),
    );
}

/// Runs one saved input in this process and reports what happened.
fn replay(t: &Target, input: &Path) -> ExitCode {
    install_panic_hook();
    let len = std::fs::metadata(input)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    // The loader sees the same file name as during fuzzing (extensions pick formats).
    let dir = std::env::temp_dir().join(format!("deltatune-fuzz-replay-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(t.file);
    if let Err(e) = std::fs::copy(input, &p) {
        eprintln!("copying {}: {e}", input.display());
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let done = run_case(t, &p, len);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}: {:?} (heap peak {:.2} MiB, limit {:.0} MiB, {:.1} ms)",
        t.name,
        done.outcome,
        done.peak as f64 / MIB as f64,
        soft_limit(len) as f64 / MIB as f64,
        started.elapsed().as_secs_f64() * 1e3
    );
    if let Some(p) = done.inner_panic {
        println!("  (a panic was caught inside the loader: {p})");
    }
    match done.outcome {
        Outcome::Panic(_) => ExitCode::from(1),
        _ if done.peak > soft_limit(len) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// The supervisor: one child per target, then the table.
fn supervise(a: &Args, selected: &[Target]) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this program's path: {e}");
            return ExitCode::from(2);
        }
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for t in selected {
        let work = work_dir(&a.out, t.name);
        let _ = std::fs::remove_file(work.join("row.json"));
        eprintln!(
            "== {} ({}): {} cases from case {}, seed {}",
            t.name, t.about, a.cases, a.start, a.seed
        );
        let t0 = Instant::now();
        let status = Command::new(&exe)
            .arg(t.name)
            .arg("--child")
            .args(["--cases", &a.cases.to_string()])
            .args(["--seed", &a.seed.to_string()])
            .args(["--start", &a.start.to_string()])
            .args(["--timeout-ms", &a.timeout_ms.to_string()])
            .arg("--out")
            .arg(&a.out)
            .status();
        let row: Option<Row> = std::fs::read(work.join("row.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match (status, row) {
            (Ok(s), Some(row)) => {
                failed |= !s.success();
                rows.push(row);
            }
            (status, _) => {
                // The child died (abort, stack overflow, memory cap): keep its last input.
                failed = true;
                let case = std::fs::read(work.join("case"))
                    .ok()
                    .and_then(|b| {
                        b.get(..8)
                            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    })
                    .unwrap_or(u64::MAX);
                let input = std::fs::read(work.join(t.file)).unwrap_or_default();
                let why = match status {
                    Ok(s) => format!("the process died: {s}"),
                    Err(e) => format!("could not run the child: {e}"),
                };
                save_crash(a, t, case, &input, &why);
                rows.push(Row {
                    target: t.name.to_string(),
                    cases: case.saturating_sub(a.start) + 1,
                    aborts: 1,
                    seconds: t0.elapsed().as_secs_f64(),
                    ..Row::default()
                });
            }
        }
    }
    print_table(&rows);
    let _ = std::fs::remove_dir_all(a.out.join(".work"));
    if failed {
        eprintln!(
            "\nFAILED: see the FAIL lines above (inputs saved under {})",
            a.out.display()
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<15} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>6} {:>6} {:>10} {:>9} {:>8} {:>9}",
        "target",
        "cases",
        "ok",
        "errors",
        "panics",
        "hangs",
        "over-mem",
        "aborts",
        "caught",
        "heap MiB",
        "heap/in",
        "cases/s",
        "RSS MiB"
    );
    for r in rows {
        println!(
            "{:<15} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>6} {:>6} {:>10.1} {:>9.1} {:>8.0} {:>9.1}",
            r.target,
            r.cases,
            r.ok,
            r.errors,
            r.panics,
            r.hangs,
            r.over_memory,
            r.aborts,
            r.inner_panics,
            r.peak_heap as f64 / MIB as f64,
            r.worst_ratio,
            r.cases as f64 / r.seconds.max(1e-9),
            r.peak_rss as f64 / MIB as f64
        );
    }
    let rss = rows.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    println!(
        "(caught: panics a loader caught itself and turned into an error; heap/in: the largest \
         case heap peak divided by its input size; peak RSS of any target process: {:.1} MiB)",
        rss as f64 / MIB as f64
    );
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let all = targets::all();
    if a.target == "list" {
        for t in &all {
            println!("{:<15} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<Target> = if a.target == "all" {
        all
    } else {
        match all.into_iter().find(|t| t.name == a.target) {
            Some(t) => vec![t],
            None => {
                eprintln!("unknown target `{}`\n{}", a.target, usage());
                return ExitCode::from(2);
            }
        }
    };
    if let Some(input) = &a.input {
        if selected.len() != 1 {
            eprintln!("--input needs one target, not `all`");
            return ExitCode::from(2);
        }
        return replay(&selected[0], input);
    }
    if a.child {
        return child(&a, &selected[0]);
    }
    supervise(&a, &selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target has a seed its loader accepts: mutations start from real, valid files.
    #[test]
    fn every_target_has_a_seed_that_loads() {
        let dir = std::env::temp_dir().join(format!("deltatune-fuzz-test-{}", std::process::id()));
        for t in targets::all() {
            let seeds = (t.seeds)().unwrap();
            let d = dir.join(t.name);
            std::fs::create_dir_all(&d).unwrap();
            let p = d.join(t.file);
            let errors: Vec<String> = seeds
                .iter()
                .filter_map(|s| {
                    std::fs::write(&p, s).unwrap();
                    (t.run)(&p).err()
                })
                .collect();
            assert!(
                errors.len() < seeds.len(),
                "{}: no seed loads: {errors:?}",
                t.name
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A case's input depends on (seed, target, case number) only, so one case replays alone.
    #[test]
    fn case_inputs_are_reproducible() {
        for t in targets::all() {
            let seeds = (t.seeds)().unwrap();
            for case in [0, 7, 12345] {
                let a = case_input(&t, &seeds, 1, case);
                let b = case_input(&t, &seeds, 1, case);
                assert_eq!(a, b, "{} case {case}", t.name);
                assert!(a.len() <= mutate::MAX_LEN);
            }
            assert_ne!(
                case_input(&t, &seeds, 1, 3),
                case_input(&t, &seeds, 2, 3),
                "{}: the seed changes the input",
                t.name
            );
        }
    }

    #[test]
    fn memory_limits_scale_with_the_input() {
        assert_eq!(soft_limit(10), 64 * MIB);
        assert_eq!(soft_limit(100 * MIB), 1600 * MIB);
        assert!(hard_cap(1) > soft_limit(1));
    }
}
