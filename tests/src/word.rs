//! The scheduler keeps its word (issue 8): each test injects the case a defect was
//! found with and checks the promise.

use anyhow::Result;
use async_nats::HeaderMap;
use bytes::Bytes;

use journal::client::Client;
use journal::subjects::Subjects;
use protocol::wire::{ErrorCode, Receipt};
use protocol::ProcessId;
use scheduler::Config;

use crate::support::*;

async fn raw_schedule(client: &Client, process: &str, headers: &[(&str, &str)]) -> Result<Receipt, journal::Error> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, *v);
    }
    let reply = client
        .request(format!("ts.schedule.{process}"), h, Bytes::from("body"))
        .await?;
    Ok(Receipt::decode(&reply.payload)?)
}

/// Header names are honoured whatever their case, and a reserved name we do not know
/// is refused: none is ever dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_headers_count_whatever_their_case() -> Result<()> {
    let server = server()?;
    let s = InProcess::start(&server, Config::default(), vec![test_key(41)]).await?;
    let nats = connect(server.url()).await?;
    wait_for_schedulers(&nats, 1).await?;
    let client = Client::new(nats, Subjects::default());

    let first = raw_schedule(&client, "cases", &[("nats-msg-id", "order-1")]).await?;
    let again = raw_schedule(&client, "cases", &[("NATS-MSG-ID", "order-1")]).await?;
    assert_eq!((again.slot, again.duplicate), (first.slot, true));
    assert_eq!(first.message_id, "order-1");

    assert_refused(
        raw_schedule(&client, "cases", &[("ts-mode", "disabled")]).await,
        ErrorCode::Disabled,
    );
    assert_refused(
        raw_schedule(&client, "cases", &[("TS-MODE", "Disabled")]).await,
        ErrorCode::Disabled,
    );
    assert_refused(
        raw_schedule(&client, "cases", &[("Ts-Mdoe", "aggressive")]).await,
        ErrorCode::Malformed,
    );
    assert_refused(
        raw_schedule(&client, "cases", &[("Nats-Msg-Id", "a"), ("nats-msg-id", "b")]).await,
        ErrorCode::Malformed,
    );
    // Nothing refused was written: the process holds the one message.
    let log = read_log(server.url(), &ProcessId::new("cases")?).await?;
    assert_eq!(log.len(), 1);
    s.stop().await?;
    Ok(())
}
