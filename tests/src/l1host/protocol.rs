//! The results channel of an L1 batch (L1's second serial port): lines framed by
//! the batch's tag, written by resources/l1host/init.

/// One command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// The command's id.
    pub id: String,
    /// Its exit code (137 when L1 killed it at its time limit).
    pub rc: i32,
    /// Seconds it took inside L1 (emulated time: a measure of nothing but progress).
    pub secs: u64,
    /// What it printed (stdout and stderr; stderr only in console mode).
    pub output: String,
}

/// What the results channel said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    /// L1 reached its /init.
    pub booted: bool,
    /// The `HOST` line: `key=value` pairs (kernel, svm, npt, tdp_mmu, ...).
    pub host: Vec<(String, String)>,
    /// `ERROR` lines.
    pub errors: Vec<String>,
    /// Finished commands, in order.
    pub results: Vec<CommandResult>,
    /// The command that began and has not ended (at the time of parsing).
    pub running: Option<String>,
    /// Everything was run.
    pub done: bool,
    /// The last `ALIVE id secs` heartbeat of the running command (L1's own count of
    /// seconds since it began).
    pub alive: Option<(String, u64)>,
    /// `DIAG` lines: what a command that outlived its KILL held (tasks, kernel stacks,
    /// kernel log), written by L1's watchdog.
    pub diag: Vec<String>,
}

impl Transcript {
    /// A `HOST` value.
    pub fn host_value(&self, key: &str) -> Option<&str> {
        self.host
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The result of command `id`.
    pub fn result(&self, id: &str) -> Option<&CommandResult> {
        self.results.iter().find(|r| r.id == id)
    }
}

/// Parse the channel's text (carriage returns ignored).
pub fn parse(tag: &str, text: &str) -> Transcript {
    let mut t = Transcript::default();
    let mut out = String::new();
    for raw in text.split('\n') {
        let line = raw.trim_end_matches('\r');
        // A marker may follow output that did not end its last line.
        let marker = line
            .match_indices(tag)
            .map(|(at, _)| at)
            .find(|&at| line[at + tag.len()..].starts_with(' '));
        let Some(at) = marker else {
            if t.running.is_some() {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        };
        if t.running.is_some() {
            out.push_str(&line[..at]);
        }
        let rest = &line[at + tag.len() + 1..];
        let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match word {
            "BOOTED" => t.booted = true,
            "HOST" => {
                t.host = arg
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }
            "ERROR" => t.errors.push(arg.to_string()),
            "BEGIN" => {
                t.running = Some(arg.to_string());
                out.clear();
            }
            "END" => {
                let mut it = arg.split_whitespace();
                let id = it.next().unwrap_or_default().to_string();
                let mut rc = -1;
                let mut secs = 0;
                for kv in it {
                    match kv.split_once('=') {
                        Some(("rc", v)) => rc = v.parse().unwrap_or(-1),
                        Some(("secs", v)) => secs = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                t.running = None;
                t.results.push(CommandResult {
                    id,
                    rc,
                    secs,
                    output: std::mem::take(&mut out),
                });
            }
            "DONE" => t.done = true,
            "ALIVE" => {
                let (id, secs) = arg.split_once(' ').unwrap_or((arg, "0"));
                t.alive = Some((id.to_string(), secs.trim().parse().unwrap_or(0)));
            }
            "DIAG" => t.diag.push(arg.to_string()),
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_batch_transcript() {
        let text = "junk\r\nT1 BOOTED\r\nT1 HOST kernel=6.1 npt=Y tdp_mmu=Y\nT1 ERROR insmod x\n\
                    T1 BEGIN a\nline one\r\nline two\nT1 END a rc=0 secs=3\nT1 BEGIN b\nhalf";
        let t = parse("T1", text);
        assert!(t.booted && !t.done);
        assert_eq!(t.host_value("npt"), Some("Y"));
        assert_eq!(t.host_value("tdp_mmu"), Some("Y"));
        assert_eq!(t.errors, vec!["insmod x".to_string()]);
        let a = t.result("a").unwrap();
        assert_eq!((a.rc, a.secs), (0, 3));
        assert_eq!(a.output, "line one\nline two\n");
        assert_eq!(t.running.as_deref(), Some("b"));
        assert!(t.result("b").is_none());
        let t = parse("T1", &format!("{text}\nT1 END b rc=137 secs=9\nT1 DONE\n"));
        assert_eq!(t.result("b").unwrap().rc, 137);
        assert_eq!(t.result("b").unwrap().output, "half\n");
        assert!(t.done);
        // Output without a final newline: the marker follows on the same line.
        let t = parse("T1", "T1 BEGIN c\n{\"a\": 1}T1 END c rc=0 secs=1\n");
        assert_eq!(t.result("c").unwrap().output, "{\"a\": 1}");
        // Heartbeats and a watchdog's diagnosis do not enter the command's output.
        let t = parse(
            "T1",
            "T1 BEGIN d\nout\nT1 ALIVE d 30\nT1 ALIVE d 60\nT1 DIAG task 7 vmm state=D\n",
        );
        assert_eq!(t.alive, Some(("d".to_string(), 60)));
        assert_eq!(t.diag, vec!["task 7 vmm state=D".to_string()]);
        let t = parse(
            "T1",
            "T1 BEGIN d\nout\nT1 ALIVE d 30\nT1 END d rc=0 secs=31\n",
        );
        assert_eq!(t.result("d").unwrap().output, "out\n");
        // Another batch's tag is not ours.
        assert!(!parse("T2", text).booted);
    }
}
