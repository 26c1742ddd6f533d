//! The tokio watcher: readiness through tokio's reactor, ack, barrier, and
//! reconnection across a daemon restart.

use std::time::Duration;

use sysgenid::{Error, Watcher};
use sysgenid_tests::*;

#[tokio::test(flavor = "current_thread")]
async fn async_watcher_reads_acks_and_survives_a_restart() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let mut w = Watcher::builder()
        .runtime_dir(dir.path())
        .open_async()
        .await
        .unwrap();
    // Nothing new: read does not complete.
    assert!(tokio::time::timeout(Duration::from_millis(100), w.read())
        .await
        .is_err());
    d.control().bump(0).unwrap();
    let g = tokio::time::timeout(Duration::from_secs(5), w.read())
        .await
        .expect("woken by the bump")
        .unwrap();
    assert_eq!(g, 1);
    let e = w.ack(7).await.unwrap_err();
    assert!(
        matches!(e, Error::WrongGeneration { current: 1, .. }),
        "{e:?}"
    );
    w.ack(1).await.unwrap();
    w.wait_watchers(Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(d.status().outdated, 0);

    // The daemon restarts and a bump happens while the watcher is away.
    d.kill9();
    d.restart();
    d.control().bump(0).unwrap();
    let g = tokio::time::timeout(Duration::from_secs(10), w.read())
        .await
        .expect("reconnected and told of the missed change")
        .unwrap();
    assert_eq!(g, 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_wait_does_not_mismatch_the_next_reply() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut me = Watcher::builder()
        .runtime_dir(dir.path())
        .open_async()
        .await
        .unwrap();
    let mut other = d.watcher();
    d.control().bump(0).unwrap();
    let g = me.read().await.unwrap();
    me.ack(g).await.unwrap();
    // The other watcher is outdated: a 300 ms wait is cancelled after 50 ms.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        me.wait_watchers(Some(Duration::from_millis(300))),
    )
    .await;
    assert!(cancelled.is_err(), "still waiting when cancelled");
    // The next request gets its own reply, not the old wait's TimedOut.
    let e = me.ack(99).await.unwrap_err();
    assert!(
        matches!(e, Error::WrongGeneration { current: 1, .. }),
        "{e:?}"
    );
    let g = other.read().unwrap();
    other.ack(g).unwrap();
    me.wait_watchers(Some(Duration::from_secs(5)))
        .await
        .unwrap();
}
