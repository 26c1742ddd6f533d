//! The event-loop attacks of `tests/attack_loop.rs`, as a separate program
//! so the tests can run it as an unprivileged user (`uid 65534`) against a
//! real daemon. It speaks the wire protocol with raw `SOCK_SEQPACKET`
//! sockets, never reads what it should not, and keeps its connections open
//! until its standard input closes.
//!
//! ```text
//! sysgenid-attack-loop waiters  SOCKET N     # 1 watcher that never acks + N × (WaitWatchers(0), Ack(G+1))
//! sysgenid-attack-loop flood    SOCKET N E   # N connections × (what the kernel buffers + E) Status requests, never reading
//! sysgenid-attack-loop pipeline SOCKET C     # C watchers sending acks with sendmmsg, draining replies
//! sysgenid-attack-loop connflood SOCKET T    # T threads: connect() then close(), in a loop
//! sysgenid-attack-loop logflood SOCKET T     # T threads: pipelined Bump frames (refused) and malformed frames
//! sysgenid-attack-loop wakeflood PAGE        # FUTEX_WAKE on the page's barrier word, in a loop
//! sysgenid-attack-loop holder SOCKET         # a tracked lifecycle participant and watcher that never confirms nor acks
//! ```
//! Each prints `ready` on stdout once its attack is in place (`waiters`
//! first prints `watching` and waits for a bump to generation G), and
//! `pipeline` prints `replies <count>` when it ends, `connflood`
//! `connects <count>`, `logflood` `refusals <count>`, `wakeflood`
//! `wakes <count>`, and `holder` one line per event (`freeze N`, `thaw N`,
//! `changed G`) as it happens.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use sysgenid_proto::{Reply, Request, Role, MAX_FRAME};
use sysgenid_tests::{hello_frame, seqpacket_connect};

/// How long one read or write on a connection may block.
const TIMEOUT: Duration = Duration::from_secs(10);

fn usage() -> ! {
    eprintln!("usage: sysgenid-attack-loop waiters|flood|pipeline|connflood|logflood|wakeflood|holder SOCKET|PAGE [N [K]]");
    std::process::exit(2)
}

/// Raises the soft descriptor limit to the hard one (no privilege needed).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// Connects as a control client and returns the current generation.
fn current_generation(path: &Path) -> u32 {
    let sock = seqpacket_connect(path, TIMEOUT).expect("connect");
    sock.send(&hello_frame(Role::Control)).expect("send Hello");
    let mut buf = [0u8; MAX_FRAME];
    let n = sock.recv(&mut buf).expect("read Welcome");
    match Reply::decode(&buf[..n]) {
        Ok(Reply::Welcome { generation, .. }) => generation,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn ready() {
    println!("ready");
    std::io::stdout().flush().unwrap();
}

/// Holds everything open until stdin closes.
fn hold() {
    let mut line = String::new();
    while std::io::stdin()
        .lock()
        .read_line(&mut line)
        .is_ok_and(|n| n > 0)
    {}
}

fn waiters(path: &Path, n: usize) {
    // A tracked watcher that never acknowledges: after the next bump it
    // holds the barrier, as any slow participant may.
    let holder = seqpacket_connect(path, TIMEOUT).expect("connect");
    holder
        .send(&hello_frame(Role::Watcher {
            untracked: false,
            acked: None,
            lifecycle: false,
        }))
        .expect("send Hello");
    holder
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let n0 = holder.recv(&mut buf).expect("read Welcome");
    assert!(matches!(
        Reply::decode(&buf[..n0]),
        Ok(Reply::Welcome { .. })
    ));
    println!("watching");
    std::io::stdout().flush().unwrap();
    let g = loop {
        let len = holder.recv(&mut buf).expect("wait for a bump");
        if let Ok(Reply::Changed { generation }) = Reply::decode(&buf[..len]) {
            break generation;
        }
    };
    let next = g.checked_add(1).expect("generation below u32::MAX");
    let mut socks = vec![holder];
    for i in 0..n {
        let sock = match seqpacket_connect(path, TIMEOUT) {
            Ok(s) => s,
            Err(e) => panic!("connection {i}: {e}"),
        };
        // Up to date at G: the wait is pending on the holder; the ack of
        // G+1 waits behind it in the socket.
        for frame in [
            hello_frame(Role::Watcher {
                untracked: false,
                acked: None,
                lifecycle: false,
            }),
            Request::WaitWatchers { timeout_ms: 0 }.encode(),
            Request::Ack { generation: next }.encode(),
        ] {
            sock.send(&frame).expect("send");
        }
        socks.push(sock);
    }
    ready();
    hold();
    drop(socks);
}

/// How many reply frames the kernel holds for one connection that does not
/// read: send far more requests than the daemon would queue for us, let it
/// drop us, then count what is still readable before the end of file.
fn kernel_capacity(path: &Path) -> usize {
    let sock = seqpacket_connect(path, TIMEOUT).expect("connect");
    sock.send(&hello_frame(Role::Control)).expect("send Hello");
    for _ in 0..1000 {
        if sock.send(&Request::Status.encode()).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let mut frames = 0;
    while sock.recv(&mut buf).is_ok_and(|n| n > 0) {
        frames += 1;
    }
    frames
}

fn flood(path: &Path, n: usize, extra: usize) {
    // Replies beyond what the kernel buffers wait in the daemon's outbox:
    // `extra` of them per connection (below the 64-frame outbox limit, so
    // no connection is dropped for its outbox alone).
    let capacity = kernel_capacity(path);
    let k = (capacity + extra).saturating_sub(1);
    eprintln!("the kernel holds {capacity} reply frames per connection: sending {k} Status requests on each of {n} connections");
    let status = Request::Status.encode();
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let sock = match seqpacket_connect(path, TIMEOUT) {
            Ok(s) => s,
            Err(e) => panic!("connection {i}: {e}"),
        };
        let _ = sock.send(&hello_frame(Role::Control));
        for _ in 0..k {
            // The daemon drops a connection that passes its budget: the
            // sends that follow fail, and that is the point.
            if sock.send(&status).is_err() {
                break;
            }
        }
        socks.push(sock);
    }
    ready();
    hold();
    drop(socks);
}

/// One flooding connection: a thread sends acks in `sendmmsg` batches as
/// fast as the socket takes them while another drains the replies; if the
/// daemon drops the connection, it connects again.
fn pipeline_one(path: &Path, generation: u32, stop: &AtomicBool, replies: &AtomicU64) {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags};
    use std::io::IoSlice;
    const BATCH: usize = 64;
    let ack = Request::Ack { generation }.encode();
    let iovs: Vec<[IoSlice<'_>; 1]> = (0..BATCH).map(|_| [IoSlice::new(&ack)]).collect();
    while !stop.load(Ordering::Relaxed) {
        let Ok(sock) = seqpacket_connect(path, TIMEOUT) else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let watcher = hello_frame(Role::Watcher {
            untracked: true,
            acked: None,
            lifecycle: false,
        });
        if sock.send(&watcher).is_err() {
            continue;
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let reader = sock.try_clone().expect("clone");
        let gone = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; MAX_FRAME];
                while !stop.load(Ordering::Relaxed) && !gone.load(Ordering::Relaxed) {
                    match reader.recv(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {
                            replies.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                gone.store(true, Ordering::Relaxed);
            });
            while !stop.load(Ordering::Relaxed) && !gone.load(Ordering::Relaxed) {
                let mut control: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                    (0..BATCH).map(|_| SendAncillaryBuffer::default()).collect();
                let mut msgs: Vec<MMsgHdr<'_>> = iovs
                    .iter()
                    .zip(control.iter_mut())
                    .map(|(iov, c)| MMsgHdr::new(iov, c))
                    .collect();
                match rustix::net::sendmmsg(&sock, &mut msgs, SendFlags::empty()) {
                    Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
                    Err(_) => break,
                }
            }
            gone.store(true, Ordering::Relaxed);
        });
    }
}

fn pipeline(path: &Path, connections: usize) {
    let g = current_generation(path);
    let path = Arc::new(path.to_path_buf());
    let replies = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (path, replies, stop) = (path.clone(), replies.clone(), stop.clone());
            std::thread::spawn(move || pipeline_one(&path, g, &stop, &replies))
        })
        .collect();
    // Flooding has begun once replies come back.
    while replies.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    ready();
    hold();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!("replies {}", replies.load(Ordering::Relaxed));
}

/// Until stdin closes, in `threads` threads: connect, close, again.
fn connflood(path: &Path, threads: usize) {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let addr = SocketAddrUnix::new(path).expect("socket path");
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, connects, addr) = (stop.clone(), connects.clone(), addr.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(fd) = rustix::net::socket_with(
                        AddressFamily::UNIX,
                        SocketType::SEQPACKET,
                        SocketFlags::CLOEXEC,
                        None,
                    ) else {
                        continue;
                    };
                    if rustix::net::connect(&fd, &addr).is_ok() {
                        connects.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(fd);
                }
            })
        })
        .collect();
    while connects.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(Duration::from_millis(1));
    }
    ready();
    hold();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    println!("connects {}", connects.load(Ordering::Relaxed));
}

/// Until stdin closes, in `threads` threads: a control connection sends
/// Bump frames (refused: nobody may bump) in batches, reading the
/// refusals, then a malformed frame (which closes it), and again.
fn logflood(path: &Path, threads: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let refusals = Arc::new(AtomicU64::new(0));
    let path = Arc::new(path.to_path_buf());
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, refusals, path) = (stop.clone(), refusals.clone(), path.clone());
            std::thread::spawn(move || {
                let bump = Request::Bump {
                    min_generation: 0,
                    allow_exhaustion: false,
                    details: Default::default(),
                }
                .encode();
                let mut buf = [0u8; MAX_FRAME];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(sock) = seqpacket_connect(&path, Duration::from_secs(2)) else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    if sock.send(&hello_frame(Role::Control)).is_err()
                        || sock.recv(&mut buf).is_err()
                    {
                        continue;
                    }
                    for _ in 0..16 {
                        for _ in 0..32 {
                            if sock.send(&bump).is_err() {
                                break;
                            }
                        }
                        for _ in 0..32 {
                            match sock.recv(&mut buf) {
                                Ok(n) if n > 0 => {
                                    if matches!(Reply::decode(&buf[..n]), Ok(Reply::Error(_))) {
                                        refusals.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                _ => break,
                            }
                        }
                    }
                    // A frame of an unknown kind: a protocol violation.
                    let _ = sock.send(&[0x7e, 1, 2, 3]);
                    let _ = sock.recv(&mut buf);
                }
            })
        })
        .collect();
    while refusals.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(Duration::from_millis(1));
    }
    ready();
    hold();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    println!("refusals {}", refusals.load(Ordering::Relaxed));
}

/// Until stdin closes: `FUTEX_WAKE` on the page's barrier word (the count
/// of outdated tracked watchers), which anyone who can read the page can
/// map.
fn wakeflood(page: &Path) {
    let file = std::fs::File::open(page).expect("open the page");
    let map = rustix::mm::MapFlags::SHARED;
    // SAFETY: a fresh read-only shared mapping of one page of a file we
    // opened; it is only read (by the futex call) and never unmapped while
    // in use.
    let base = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            4096,
            rustix::mm::ProtFlags::READ,
            map,
            &file,
            0,
        )
    }
    .expect("map the page");
    // SAFETY: offset 40 is inside the mapped page and 4-byte aligned; the
    // atomic is only used as a futex address.
    let word = unsafe {
        &*(base
            .cast::<u8>()
            .add(40)
            .cast::<std::sync::atomic::AtomicU32>())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let waker = {
        let stop = stop.clone();
        let word = word as *const std::sync::atomic::AtomicU32 as usize;
        std::thread::spawn(move || {
            // SAFETY: the mapping outlives this thread (joined below).
            let word = unsafe { &*(word as *const std::sync::atomic::AtomicU32) };
            let mut wakes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = rustix::thread::futex::wake(
                    word,
                    rustix::thread::futex::Flags::empty(),
                    u32::MAX,
                );
                wakes += 1;
            }
            wakes
        })
    };
    ready();
    hold();
    stop.store(true, Ordering::Relaxed);
    let wakes = waker.join().unwrap();
    println!("wakes {wakes}");
}

/// A tracked watcher that is a lifecycle participant, and never confirms a
/// freeze nor acknowledges a change; prints each event it is told of.
fn holder(path: &Path) {
    let sock = seqpacket_connect(path, TIMEOUT).expect("connect");
    sock.send(&hello_frame(Role::Watcher {
        untracked: false,
        acked: None,
        lifecycle: true,
    }))
    .expect("send Hello");
    sock.set_read_timeout(None).unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let n = sock.recv(&mut buf).expect("read Welcome");
    assert!(matches!(
        Reply::decode(&buf[..n]),
        Ok(Reply::Welcome { .. })
    ));
    let reader = sock.try_clone().expect("clone");
    std::thread::spawn(move || loop {
        let Ok(n) = reader.recv(&mut buf) else { return };
        if n == 0 {
            return;
        }
        let line = match Reply::decode(&buf[..n]) {
            Ok(Reply::Freeze { freeze, .. }) => format!("freeze {freeze}"),
            Ok(Reply::Thaw { freeze, .. }) => format!("thaw {freeze}"),
            Ok(Reply::Changed { generation }) => format!("changed {generation}"),
            other => format!("other {other:?}"),
        };
        println!("{line}");
        std::io::stdout().flush().unwrap();
    });
    ready();
    hold();
    drop(sock);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(path)) = (args.first(), args.get(1)) else {
        usage()
    };
    let path = PathBuf::from(path);
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    raise_nofile();
    match mode.as_str() {
        "waiters" => waiters(&path, num(2)),
        "flood" => flood(&path, num(2), num(3)),
        "pipeline" => pipeline(&path, num(2)),
        "connflood" => connflood(&path, num(2)),
        "logflood" => logflood(&path, num(2)),
        "wakeflood" => wakeflood(&path),
        "holder" => holder(&path),
        _ => usage(),
    }
}
