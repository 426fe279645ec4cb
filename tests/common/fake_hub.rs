//! A stand-in for the Hub's download endpoint on a loopback port, enough for hf-hub's
//! `download_file`: `HEAD`/`GET /<repo>/resolve/<revision>/<file>` answered with `ETag`,
//! `X-Repo-Commit` and `Content-Length`, 404 with `X-Error-Code: EntryNotFound` for a missing file,
//! 401 `RepoNotFound` for an unknown repository, and 401 `GatedRepo` when a token is required
//! and absent. One request per connection (`Connection: close`). It serves at most
//! `MAX_CONNECTIONS` connections and only ever listens on 127.0.0.1.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

const MAX_CONNECTIONS: usize = 1000;

#[derive(Default)]
struct State {
    repo: String,
    /// Branch or tag → commit.
    refs: HashMap<String, String>,
    /// (commit, file) → content.
    files: HashMap<(String, String), Vec<u8>>,
    /// A token every request must carry, if set.
    token: Option<String>,
    /// "METHOD path" of each request, in order.
    log: Vec<String>,
}

pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start(repo: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repo: repo.to_string(),
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().take(MAX_CONNECTIONS).flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { endpoint, state }
    }

    pub fn set_ref(&self, revision: &str, commit: &str) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.refs.insert(revision.to_string(), commit.to_string());
        self
    }

    pub fn add_file(&self, commit: &str, name: &str, bytes: &[u8]) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.files
            .insert((commit.to_string(), name.to_string()), bytes.to_vec());
        self
    }

    pub fn require_token(&self, token: &str) -> &Self {
        self.state.lock().unwrap().token = Some(token.to_string());
        self
    }

    /// "METHOD path" of the requests so far.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut auth = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        auth = Some(v.trim().to_string());
                    }
                }
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let response = respond(state, method, path, auth.as_deref());
    let mut stream = stream;
    let _ = stream.write_all(&response);
    let _ = stream.flush();
}

fn respond(state: &Mutex<State>, method: &str, path: &str, auth: Option<&str>) -> Vec<u8> {
    let mut s = state.lock().unwrap();
    s.log.push(format!("{method} {path}"));
    let Some(rest) = path.strip_prefix(&format!("/{}/resolve/", s.repo)) else {
        return reply(
            method,
            "401 Unauthorized",
            &[("X-Error-Code", "RepoNotFound")],
            b"",
        );
    };
    if let Some(token) = &s.token {
        if auth != Some(&format!("Bearer {token}")) {
            return reply(
                method,
                "401 Unauthorized",
                &[("X-Error-Code", "GatedRepo")],
                b"",
            );
        }
    }
    let Some((revision, file)) = rest.split_once('/') else {
        return reply(method, "400 Bad Request", &[], b"");
    };
    let revision = revision.replace("%2F", "/");
    let commit = if revision.len() == 40 {
        revision.clone()
    } else if let Some(c) = s.refs.get(&revision) {
        c.clone()
    } else {
        return reply(
            method,
            "404 Not Found",
            &[("X-Error-Code", "RevisionNotFound")],
            b"",
        );
    };
    match s.files.get(&(commit.clone(), file.to_string())) {
        Some(bytes) => {
            let etag = format!("\"{}\"", etag(bytes));
            reply(
                method,
                "200 OK",
                &[("ETag", &etag), ("X-Repo-Commit", &commit)],
                bytes,
            )
        }
        None => reply(
            method,
            "404 Not Found",
            &[
                ("X-Error-Code", "EntryNotFound"),
                ("X-Repo-Commit", &commit),
            ],
            b"",
        ),
    }
}

fn reply(method: &str, status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body);
    }
    out
}

fn etag(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}
