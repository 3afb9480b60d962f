//! `/v1/events`: every change a client is told of, numbered per tenant, in order, carrying the
//! resource as its endpoint shows it.

use crate::backend_tests;

use crate::support::*;
use falgate::emulator::ModelFailure;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Every event of the tenant matching `query`, walking the pages `limit` at a time.
async fn all_events(app: &TestApp, query: &str, limit: u32) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let page = app
            .get_json(&format!(
                "/v1/events?limit={limit}&after={after}{}",
                if query.is_empty() {
                    String::new()
                } else {
                    format!("&{query}")
                }
            ))
            .await;
        let page_items = items(&page).clone();
        assert!(page_items.len() <= limit as usize, "{page}");
        if let Some(last) = page_items.last() {
            after = last["sequence"].as_i64().unwrap();
        }
        events.extend(page_items);
        if page["has_more"] != true {
            return events;
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// The job as `GET /v1/jobs/{id}` shows it, without its history.
async fn job_as_get_shows_it(app: &TestApp, id: &str) -> Value {
    let mut job = app.job(id).await;
    job.as_object_mut().unwrap().remove("events");
    job
}

backend_tests!(a_jobs_events_tell_each_move_in_order_with_the_job_as_get_shows_it);
async fn a_jobs_events_tell_each_move_in_order_with_the_job_as_get_shows_it(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "a lighthouse"})).await;
    app.wait_for_status(&id, "succeeded").await;
    let events = eventually("the job's last event")
        .until(async || {
            let events = all_events(app, &format!("resource_id={id}"), 100).await;
            (types(&events).last() == Some(&"job.succeeded")).then_some(events)
        })
        .await;

    // Each move told once, in order, ending with success; numbered upwards; each carrying the
    // job in the state it tells of.
    assert_told_a_succeeding_job(&types(&events));
    for event in &events {
        let kind = event["type"].as_str().unwrap();
        assert_eq!(event["data"]["status"], kind.trim_start_matches("job."));
    }
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");

    // The last event carries the job exactly as GET shows it now that it has ended.
    let last = events.last().unwrap();
    assert_eq!(last["data"], job_as_get_shows_it(app, &id).await);

    // Each event reads back alone as it was listed.
    for event in &events {
        let alone = app
            .get_json(&format!("/v1/events/{}", event["id"].as_str().unwrap()))
            .await;
        assert_eq!(&alone, event);
    }
}

backend_tests!(a_training_and_a_batch_are_told_once_each_and_numbered_without_gaps);
async fn a_training_and_a_batch_are_told_once_each_and_numbered_without_gaps(app: &TestApp) {
    let avatar = trainable_avatar(app, "character").await;
    let training = train_json(app, &avatar, json!({})).await;
    wait_for_avatar(app, &avatar, "ready").await;
    // Six generations that FAL ends together: however their last transitions interleave, the
    // batch is told complete once, after all of its jobs.
    let prompts: Vec<String> = (0..6).map(|n| format!("portrait {n}")).collect();
    let batch = generate(app, json!({"avatar_id": avatar, "prompts": prompts})).await;
    let batch_id = id_of(&batch);
    let done = wait_for_batch(app, &batch_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let events = eventually("the batch's completion")
        .until(async || {
            let events = all_events(app, "", 3).await;
            types(&events)
                .contains(&"batch.completed")
                .then_some(events)
        })
        .await;
    // The tenant's events are numbered 1, 2, 3… with no gap, across pages.
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, (1..=events.len() as i64).collect::<Vec<_>>());

    let of_type =
        |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["type"] == kind).collect() };
    let started = of_type("avatar.training_started");
    assert_eq!(started.len(), 1, "{:?}", types(&events));
    assert_eq!(started[0]["data"]["id"], avatar.as_str());
    assert_eq!(started[0]["data"]["status"], "training");
    assert_eq!(started[0]["data"]["training_job_id"], training["id"]);
    let ready = of_type("avatar.ready");
    assert_eq!(ready.len(), 1, "{:?}", types(&events));
    assert_eq!(ready[0]["data"]["status"], "ready");
    let now = app.get_json(&format!("/v1/avatars/{avatar}")).await;
    assert_eq!(
        ready[0]["data"]["artifact"]["lora_url"],
        now["artifact"]["lora_url"]
    );
    assert!(started[0]["sequence"].as_i64() < ready[0]["sequence"].as_i64());

    let completed = of_type("batch.completed");
    assert_eq!(completed.len(), 1, "{:?}", types(&events));
    assert_eq!(
        completed[0]["data"],
        app.get_json(&format!("/v1/batches/{batch_id}")).await
    );
    // Every job of the batch was told succeeded before the batch was told complete.
    let job_ids: Vec<&str> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    for job in &job_ids {
        let succeeded: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "job.succeeded" && e["data"]["id"] == *job)
            .collect();
        assert_eq!(succeeded.len(), 1, "job {job}");
        assert!(succeeded[0]["sequence"].as_i64() < completed[0]["sequence"].as_i64());
    }

    // A batch's events are its jobs' and its own.
    let of_batch = all_events(app, &format!("resource_id={batch_id}"), 100).await;
    assert_eq!(types(&of_batch).last(), Some(&"batch.completed"));
    assert!(of_batch.iter().all(|e| {
        e["type"] == "batch.completed" || job_ids.contains(&e["data"]["id"].as_str().unwrap())
    }));
    // A filter on the type keeps that type alone.
    let succeeded = all_events(app, "type=job.succeeded", 100).await;
    assert!(!succeeded.is_empty());
    assert!(succeeded.iter().all(|e| e["type"] == "job.succeeded"));
    assert_eq!(succeeded.len(), of_type("job.succeeded").len());
}

backend_tests!(a_failed_training_is_told_with_the_avatar_failed);
async fn a_failed_training_is_told_with_the_avatar_failed(app: &TestApp) {
    let avatar = trainable_avatar(app, "character").await;
    app.fal.fail_next_models(ModelFailure::new(422), 1);
    let training = train_json(app, &avatar, json!({})).await;
    wait_for_avatar(app, &avatar, "failed").await;
    let events = eventually("the avatar's failure")
        .until(async || {
            let events = all_events(app, &format!("resource_id={avatar}"), 100).await;
            (types(&events).last() == Some(&"avatar.failed")).then_some(events)
        })
        .await;
    assert_eq!(types(&events), ["avatar.training_started", "avatar.failed"]);
    let failed = &events[1]["data"];
    assert_eq!(
        failed,
        &app.get_json(&format!("/v1/avatars/{avatar}")).await
    );
    let job = all_events(app, &format!("resource_id={}", id_of(&training)), 100).await;
    assert_eq!(types(&job).last(), Some(&"job.failed"));
    assert_eq!(
        failed["error"]["code"],
        job.last().unwrap()["data"]["error"]["code"]
    );
}

backend_tests!(events_are_the_tenants_own_and_bad_queries_are_refused);
async fn events_are_the_tenants_own_and_bad_queries_are_refused(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "mine"})).await;
    app.wait_for_status(&id, "succeeded").await;
    let mine = eventually("an event")
        .until(async || all_events(app, "", 100).await.into_iter().next())
        .await;

    // Another tenant sees none of them, and cannot read one by its id.
    let other = app.new_key("other").await;
    let page: Value = app.get_as(&other, "/v1/events").await.json().await.unwrap();
    assert_eq!(items(&page).len(), 0, "{page}");
    let path = format!("/v1/events/{}", mine["id"].as_str().unwrap());
    problem(
        app.get_as(&other, &path).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        app.get(&format!("/v1/events/{}", uuid::Uuid::now_v7()))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    assert_queries_refused(
        app,
        &[
            ("/v1/events?type=job.pending", &["type"]),
            ("/v1/events?after=-1", &["after"]),
            ("/v1/events?after=x", &["after"]),
            ("/v1/events?limit=0", &["limit"]),
            ("/v1/events?resource_id=nope", &["resource_id"]),
            ("/v1/events?colour=red", &["colour"]),
        ],
    )
    .await;
    problem(
        app.get("/v1/events/nope").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
}

backend_tests!(two_replicas_number_every_event_once_and_in_each_jobs_order);
async fn two_replicas_number_every_event_once_and_in_each_jobs_order(app: &TestApp) {
    // A second process on the same database, with its own workers, taking half the jobs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config_for(&app.database_url);
    point_at_emulator(&mut config, &app.fal, listener.local_addr().unwrap());
    let replica = falgate::app::App::build(config, listener).await.unwrap();
    let replica_base = format!("http://{}", replica.local_addr());
    // A client follows the tenant's stream on the other process.
    let mut stream =
        crate::streams::Reader::open_at(app, &format!("{replica_base}/v1/events/stream"), None)
            .await;

    let posts = (0..24).map(|n| {
        let url = match n % 2 {
            0 => app.url("/v1/jobs"),
            _ => format!("{replica_base}/v1/jobs"),
        };
        let request =
            app.client.post(url).bearer_auth(&app.key).json(
                &json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": format!("n{n}")}}),
            );
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            id_of(&response.json().await.unwrap())
        }
    });
    let ids: Vec<String> = futures_util::future::join_all(posts).await;
    for id in &ids {
        app.wait_for_status(id, "succeeded").await;
    }
    let events = eventually("every job's end told")
        .until(async || {
            let events = all_events(app, "", 100).await;
            let ended = events
                .iter()
                .filter(|e| e["type"] == "job.succeeded")
                .count();
            (ended == ids.len()).then_some(events)
        })
        .await;

    // Numbered 1, 2, 3… once each, whichever process wrote or numbered them.
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, (1..=events.len() as i64).collect::<Vec<_>>());
    // Each job's moves are told once each, in the order they happened.
    for id in &ids {
        let told: Vec<&str> = events
            .iter()
            .filter(|e| e["data"]["id"] == id.as_str())
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_told_a_succeeding_job(&told);
    }
    // The other process lists the same events.
    let page: Value = app
        .client
        .get(format!("{replica_base}/v1/events?limit=100"))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(items(&page), &events[..100.min(events.len())].to_vec());
    // The stream on the other process told every event, once, in order.
    let mut streamed = Vec::new();
    while streamed.len() < events.len() {
        let (sequence, _, data) = stream.next_event().await.expect("the stream goes on");
        assert_eq!(data["sequence"], sequence);
        streamed.push(data);
    }
    assert_eq!(streamed, events);
    replica.shutdown().await;
}

/// Runs `sql` (a query answering one count) on the test's PostgreSQL database.
async fn count_on(app: &TestApp, sql: &'static str) -> i64 {
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let count: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    count
}

/// The connections listening for events, each process's own.
const LISTENING: &str = "SELECT count(*) FROM pg_stat_activity \
    WHERE datname = current_database() AND query ILIKE 'LISTEN%'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(falgate_postgres_tests),
    ignore = "set FALGATE_TEST_POSTGRES_URL to run it"
)]
async fn replicas_listen_again_after_their_listening_connections_are_cut() {
    with_app(
        Backend::Postgres,
        |_| {},
        async |app: &TestApp| {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut config = config_for(&app.database_url);
            point_at_emulator(&mut config, &app.fal, listener.local_addr().unwrap());
            let replica = falgate::app::App::build(config, listener).await.unwrap();
            let replica_base = format!("http://{}", replica.local_addr());
            let mut stream = crate::streams::Reader::open_at(
                app,
                &format!("{replica_base}/v1/events/stream"),
                None,
            )
            .await;
            let told_end = async |stream: &mut crate::streams::Reader, job: &str| loop {
                let (_, kind, data) = stream.next_event().await.expect("the stream goes on");
                if kind == "job.succeeded" && data["data"]["id"] == job {
                    return;
                }
            };
            let before = submit_raw(app, json!({"prompt": "before the cut"})).await;
            told_end(&mut stream, &before).await;
            eventually("both processes listening")
                .until(async || (count_on(app, LISTENING).await == 2).then_some(()))
                .await;

            let cut = count_on(
                app,
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query ILIKE 'LISTEN%') AS cut",
            )
            .await;
            assert_eq!(cut, 2);
            // Each listens again by itself, and the stream on the other process goes on.
            eventually("both processes listening again")
                .until(async || (count_on(app, LISTENING).await == 2).then_some(()))
                .await;
            let after = submit_raw(app, json!({"prompt": "after the cut"})).await;
            told_end(&mut stream, &after).await;
            replica.shutdown().await;
        },
    )
    .await;
}
