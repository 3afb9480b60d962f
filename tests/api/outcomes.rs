//! A job's outcome is FAL's, reached once, under faults in combination: lost answers, lost
//! callbacks, outages of single calls, stale and replayed callbacks, cancels in doubt.

use crate::backend_tests;
use crate::support::*;
use falgate::config::{Config, Secret};
use falgate::emulator::{
    CallbackFault, Durations, FaultRule, FaultTarget, HttpFault, ModelFailure,
};
use falgate::fal::token::CallbackSigner;
use falgate::store::{IdempotencyClaim, IdempotencyState};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

fn fault(target: FaultTarget, fault: HttpFault, count: u32) -> FaultRule {
    FaultRule {
        target,
        fault,
        count,
    }
}

/// A submit whose answer is lost stays in doubt for `wait` before it is sent again (unless a
/// callback names its request); the reconciler asks FAL soon after a missed callback.
fn in_doubt_for(config: &mut Config, wait: Duration) {
    config.workers.callback_grace = Duration::from_millis(100);
    config.workers.unconfirmed_submit_wait = wait;
}

/// The emulator's requests whose webhook names `job`.
fn requests_for(app: &TestApp, job: &str) -> Vec<falgate::emulator::RequestSnapshot> {
    app.fal
        .requests()
        .into_iter()
        .filter(|r| r.webhook.as_deref().is_some_and(|w| w.contains(job)))
        .collect()
}

/// The `submit` notes of a job's history (`unconfirmed`, `resent`).
fn submit_notes(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"]["submit"].as_str().map(str::to_owned))
        .collect()
}

/// A raw job whose first submit meets `fault`, so that it is in doubt, while whatever FAL
/// queues stays queued; answers its id once its history notes the submit as unconfirmed.
async fn job_in_doubt(app: &TestApp, fault: HttpFault, prompt: &str) -> String {
    app.fal.set_all_durations(Durations::new(600_000, 0));
    let id = submit_raw_meeting(app, fault, 1, prompt).await;
    eventually("the submit noted as unconfirmed")
        .until(async || (submit_notes(&app.job(&id).await) == ["unconfirmed"]).then_some(()))
        .await;
    id
}

async fn metric(app: &TestApp, name: &str) -> u64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

backend_tests!(
    a_lost_callback_and_failing_status_and_result_calls_still_end_in_fals_result,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_lost_callback_and_failing_status_and_result_calls_still_end_in_fals_result(
    app: &TestApp,
) {
    // FAL finishes the request, its callback is lost, and each of status and result fails
    // with JSON 5xx answers before they work: outages of single calls, not verdicts.
    app.fal.inject_callback_fault(CallbackFault::Drop, 1);
    let status_500 = HttpFault::Status {
        status: 503,
        body: None,
        retry_after: None,
        timeout_type_user: false,
    };
    app.fal
        .inject_fault(fault(FaultTarget::Status, status_500, 1));
    app.fal
        .inject_fault(fault(FaultTarget::Result, FaultRule::status(500), 1));
    app.fal
        .inject_fault(fault(FaultTarget::Result, FaultRule::status(503), 1));
    let id = submit_raw(app, json!({"prompt": "survives outages"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    let requests = requests_for(app, &id);
    assert_eq!(requests.len(), 1);
    assert_eq!(job["fal_request_id"], requests[0].id.as_str());
    assert_eq!(&job["result"], &requests[0].outcome.as_ref().unwrap().body);
    assert!(job["error"].is_null(), "{job}");
}

backend_tests!(
    a_model_that_fails_with_a_5xx_fails_the_job_with_fals_verdict,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_model_that_fails_with_a_5xx_fails_the_job_with_fals_verdict(app: &TestApp) {
    // FAL's own verdict, learnt by polling: COMPLETED with an error, the result a 500.
    app.fal.inject_callback_fault(CallbackFault::Drop, 1);
    app.fal.fail_next_models(ModelFailure::new(500), 1);
    let id = submit_raw(app, json!({"prompt": "the runner breaks"})).await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "fal_model_error", "{job}");
}

backend_tests!(
    a_stale_callback_after_a_lost_submit_answer_ends_the_job_at_once,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_stale_callback_after_a_lost_submit_answer_ends_the_job_at_once(app: &TestApp) {
    // The submit's answer is lost, and the only callback is too old to be trusted: the job
    // learns FAL's request id and nothing else, and must still be followed to its end.
    app.fal
        .inject_fault(FaultRule::submit(HttpFault::AcceptThenReset, 1));
    app.fal
        .inject_callback_fault(CallbackFault::StaleTimestamp, 1);
    let id = submit_raw(app, json!({"prompt": "followed by its id alone"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    let requests = requests_for(app, &id);
    assert_eq!(requests.len(), 1, "sent once");
    assert_eq!(job["fal_request_id"], requests[0].id.as_str());
    assert_eq!(&job["result"], &requests[0].outcome.as_ref().unwrap().body);
    assert_eq!(submit_notes(&job), ["unconfirmed"]);
}

backend_tests!(
    a_lost_submit_answer_waits_for_the_callback_however_late,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_lost_submit_answer_waits_for_the_callback_however_late(app: &TestApp) {
    // The answer is lost and the callback comes long after the callback grace: the job is
    // not sent again meanwhile, says why in its history, and takes the request it names.
    let id = job_in_doubt(app, HttpFault::AcceptThenReset, "answer lost").await;
    assert_eq!(metric(app, "falgate_submits_unconfirmed_total").await, 1);
    // Well past the grace, and past several submit backoffs: still one request.
    let first = requests_for(app, &id);
    assert_eq!(first.len(), 1);
    throughout(
        Duration::from_secs(2),
        Duration::from_millis(50),
        async || assert_eq!(app.fal.submits().len(), 1, "sent again blind"),
    )
    .await;
    assert_eq!(app.job(&id).await["status"], "pending");
    app.fal
        .set_request_durations(&first[0].id, Durations::new(0, 0));
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(job["fal_request_id"], first[0].id.as_str());
    assert_eq!(app.fal.submits().len(), 1);
    assert_eq!(metric(app, "falgate_submits_resent_total").await, 0);
}

backend_tests!(
    a_submit_answered_later_than_its_timeout_is_not_sent_twice,
    |config| {
        in_doubt_for(config, Duration::from_secs(2));
        // FAL calls time out at three quarters of the lease.
        config.workers.lease = Duration::from_millis(800);
    }
);
async fn a_submit_answered_later_than_its_timeout_is_not_sent_twice(app: &TestApp) {
    // Whether FAL queued the slow submit or dropped it with the connection, the job runs
    // once: adopted from its callback, or sent again after the wait.
    let id = submit_raw_meeting(app, HttpFault::Delay { delay_ms: 1_500 }, 1, "slow door").await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(requests_for(app, &id).len(), 1);
    assert_eq!(submit_notes(&job)[0], "unconfirmed");
}

backend_tests!(
    with_no_word_from_fal_within_the_wait_the_job_is_sent_again_and_says_so,
    |config| in_doubt_for(config, Duration::from_millis(500))
);
async fn with_no_word_from_fal_within_the_wait_the_job_is_sent_again_and_says_so(app: &TestApp) {
    // FAL's ingress answers 502 without queueing anything: no callback can come.
    let id = submit_raw_meeting(app, HttpFault::Nginx502, 1, "nothing there").await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(submit_notes(&job), ["unconfirmed", "resent"]);
    assert_eq!(requests_for(app, &id).len(), 1);
    assert_eq!(metric(app, "falgate_submits_resent_total").await, 1);
}

/// A submit in doubt for a short while: the callback grace and the wait for evidence.
fn in_doubt_for_a_while(config: &mut Config) {
    in_doubt_for(config, Duration::from_millis(1_500));
}

backend_tests!(
    a_cancel_while_a_submit_is_in_doubt_waits_for_fals_word,
    in_doubt_for_a_while
);
async fn a_cancel_while_a_submit_is_in_doubt_waits_for_fals_word(app: &TestApp) {
    // In doubt, and FAL did queue it: the cancel is kept, and when FAL's callback names
    // the request, the job ends as FAL ended that request.
    let queued = job_in_doubt(app, HttpFault::AcceptThenReset, "cancelled in doubt").await;
    let answer = app.cancel(&queued).await;
    assert_eq!(answer["status"], "pending", "{answer}");
    assert!(answer["cancel_requested_at"].is_string());
    let request = requests_for(app, &queued).remove(0);
    app.fal
        .set_request_durations(&request.id, Durations::new(0, 0));
    let job = app.wait_for_status(&queued, "succeeded").await;
    assert_eq!(job["fal_request_id"], request.id.as_str());
}

backend_tests!(
    a_cancel_while_a_submit_is_in_doubt_is_confirmed_once_fal_has_nothing,
    in_doubt_for_a_while
);
async fn a_cancel_while_a_submit_is_in_doubt_is_confirmed_once_fal_has_nothing(app: &TestApp) {
    // In doubt, and FAL has nothing: once the wait is over the cancel is confirmed, and
    // nothing is sent (had it been, FAL would hold it queued).
    let absent = job_in_doubt(app, HttpFault::Nginx502, "never queued").await;
    assert_eq!(app.cancel(&absent).await["status"], "pending");
    let job = app.wait_for_status(&absent, "canceled").await;
    assert!(job["fal_request_id"].is_null());
    assert!(
        job["error"].is_null(),
        "a cancelled job did not fail: {job}"
    );
    assert!(requests_for(app, &absent).is_empty());
    assert_eq!(
        app.fal
            .submits()
            .iter()
            .filter(|s| s.input["prompt"] == "never queued")
            .count(),
        1
    );
}

backend_tests!(
    a_genuine_callback_replayed_to_another_pending_job_is_foreign,
    with_callback_grace(Duration::from_secs(15))
);
async fn a_genuine_callback_replayed_to_another_pending_job_is_foreign(app: &TestApp) {
    let done = submit_raw(app, json!({"prompt": "the original"})).await;
    app.wait_for_status(&done, "succeeded").await;
    // The emulator records a delivery once it has its answer, a moment after falgate acted.
    let genuine = eventually("the delivery recorded")
        .until(async || app.fal.callback_attempts().first().cloned())
        .await;
    // A second job that stays pending: FAL refuses its submits.
    let pending = submit_raw_meeting(app, FaultRule::status(503), 1_000, "stays pending").await;
    let signer = CallbackSigner::new(vec![Secret::new(TEST_WEBHOOK_SECRET)]).unwrap();
    let replay = app
        .client
        .post(app.url(&format!(
            "/v1/fal/webhook/{pending}?token={}",
            signer.token(&pending)
        )))
        .header("content-type", "application/json")
        .header("x-fal-webhook-request-id", &genuine.request_id)
        .header("x-fal-webhook-user-id", app.fal.state().user_id())
        .header("x-fal-webhook-timestamp", &genuine.timestamp)
        .header("x-fal-webhook-signature", &genuine.signature)
        .body(genuine.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let job = app.job(&pending).await;
    assert_eq!(job["status"], "pending");
    assert!(job["fal_request_id"].is_null());
    let stored = app
        .store()
        .list_callbacks(pending.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].outcome, "foreign_request");
}

backend_tests!(
    a_duplicate_callback_leaves_a_finished_job_as_it_was,
    with_callback_grace(Duration::from_secs(15))
);
async fn a_duplicate_callback_leaves_a_finished_job_as_it_was(app: &TestApp) {
    app.fal.inject_callback_fault(CallbackFault::Duplicate, 1);
    let id = submit_raw(app, json!({"prompt": "told twice"})).await;
    let first = app.wait_for_status(&id, "succeeded").await;
    eventually("the duplicate delivered")
        .until(async || {
            let answered = app
                .fal
                .callback_attempts()
                .iter()
                .filter(|a| a.status == Some(200))
                .count();
            (answered == 2).then_some(())
        })
        .await;
    let after = app.job(&id).await;
    assert_eq!(after["updated_at"], first["updated_at"]);
    assert_eq!(after["events"], first["events"]);
}

backend_tests!(a_post_whose_process_died_mid_request_is_answered_within_seconds);
async fn a_post_whose_process_died_mid_request_is_answered_within_seconds(app: &TestApp) {
    // A claim on the key left by a process that died 11 s ago, and one by a request that
    // is still at work (its claim renewed a second ago).
    let tenant = app.tenant().await;
    let body = json!({"endpoint": "fal-ai/flux-lora", "input": {"prompt": "retried"}});
    let claim = |key: &str, age: i64| {
        let now = falgate::domain::now();
        IdempotencyClaim {
            tenant,
            key: key.into(),
            token: uuid::Uuid::new_v4(),
            fingerprint: falgate::domain::idempotency::fingerprint(
                "POST /v1/jobs",
                &serde_json::to_vec(&body).unwrap(),
            ),
            now: now - chrono::TimeDelta::seconds(age),
            expires_before: now - chrono::TimeDelta::hours(24),
            abandoned_before: now - chrono::TimeDelta::hours(1),
        }
    };
    for (key, age) in [("died", 11), ("alive", 1)] {
        assert_eq!(
            app.store()
                .claim_idempotency_key(&claim(key, age))
                .await
                .unwrap(),
            IdempotencyState::Claimed
        );
    }
    let post = |key: &'static str| {
        app.request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let retried = post("died").await.unwrap();
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    let busy = problem(
        post("alive").await.unwrap(),
        StatusCode::CONFLICT,
        "idempotency_key_in_use",
    )
    .await;
    assert!(
        busy["detail"].as_str().unwrap().contains("within 10 s"),
        "{busy}"
    );
}

backend_tests!(
    a_cancelled_request_whose_result_call_fails_once_still_ends_canceled,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_cancelled_request_whose_result_call_fails_once_still_ends_canceled(app: &TestApp) {
    // Running at FAL when the client cancels; FAL's cancellation callback is lost, and
    // the first look at the result meets an outage with an error type of its own.
    app.fal.set_all_durations(Durations::new(0, 30_000));
    let id = submit_raw(app, json!({"prompt": "cancelled while drawing"})).await;
    app.wait_for_status(&id, "running").await;
    app.fal.inject_callback_fault(CallbackFault::Drop, 1);
    app.fal
        .inject_fault(fault(FaultTarget::Result, FaultRule::status(503), 1));
    app.cancel(&id).await;
    let job = app.wait_for_status(&id, "canceled").await;
    assert!(job["error"].is_null(), "{job}");
    assert!(job["result"].is_null());
}

backend_tests!(
    submits_in_doubt_stop_at_the_submit_deadline_and_the_job_ends_at_its_own,
    |config| {
        in_doubt_for(config, Duration::from_millis(300));
        config.workers.submit_deadline = Duration::from_secs(2);
        config.workers.generation_deadline = Duration::from_secs(4);
    }
);
async fn submits_in_doubt_stop_at_the_submit_deadline_and_the_job_ends_at_its_own(app: &TestApp) {
    // Every submit meets a gateway error: each may have reached FAL, none is confirmed.
    let id = submit_raw_meeting(app, HttpFault::Nginx502, 1_000, "never confirmed").await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "deadline_exceeded", "{job}");
    let created =
        chrono::DateTime::parse_from_rfc3339(job["created_at"].as_str().unwrap()).unwrap();
    // No submit left after the submit deadline.
    let last_sent = app
        .fal
        .submits()
        .iter()
        .map(|s| chrono::DateTime::<chrono::Utc>::from(s.at))
        .max()
        .unwrap();
    assert!(
        last_sent <= created + chrono::TimeDelta::milliseconds(2_500),
        "sent at {last_sent}, created {created}"
    );
    assert!(
        submit_notes(&job).iter().filter(|n| *n == "resent").count() >= 1,
        "{job}"
    );
}

backend_tests!(
    a_gateway_error_naming_a_request_is_checked_with_fal,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_gateway_error_naming_a_request_is_checked_with_fal(app: &TestApp) {
    // A 500 naming a request FAL does not hold: the submit was refused, and is retried at
    // once rather than waited on.
    let refused = submit_raw_meeting(app, FaultRule::status(500), 1, "named but not queued").await;
    let job = app.wait_for_status(&refused, "succeeded").await;
    assert!(submit_notes(&job).is_empty(), "{job}");
    assert_eq!(requests_for(app, &refused).len(), 1);
    assert_eq!(app.fal.submits().len(), 2);
}

backend_tests!(
    a_sandbox_job_in_a_shared_database_never_reaches_the_real_fal,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_sandbox_job_in_a_shared_database_never_reaches_the_real_fal(app: &TestApp) {
    // A job the sandbox left pending in this database, served now against "the real FAL".
    let tenant = app.tenant().await;
    let left = falgate::store::NewJob {
        id: uuid::Uuid::now_v7(),
        tenant,
        kind: falgate::domain::job::JobKind::Raw,
        avatar_id: None,
        batch_id: None,
        endpoint: "fal-ai/flux-lora".into(),
        input: json!({"prompt": "made in the sandbox"}),
        sandbox: true,
        idempotency_key: None,
        created_at: falgate::domain::now(),
    };
    let left_id = left.id;
    app.store()
        .create_jobs(vec![left], None, None)
        .await
        .unwrap();
    let real = submit_raw(app, json!({"prompt": "made for real"})).await;
    app.wait_for_status(&real, "succeeded").await;
    assert_eq!(app.job(&left_id.to_string()).await["status"], "pending");
    assert!(
        app.fal
            .submits()
            .iter()
            .all(|s| s.input["prompt"] != "made in the sandbox")
    );
}
