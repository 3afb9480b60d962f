//! Jobs through FAL (the emulator) to their end: callbacks, polling, faults, cancels.

use crate::backend_tests;
use crate::execute_behind_the_apps_back;
use crate::support::*;
use falgate::config::Secret;
use falgate::emulator::{CallbackFault, Durations, FaultRule, HttpFault, Phase};
use falgate::fal::token::CallbackSigner;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

fn events(job: &Value) -> Vec<(String, String)> {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["to"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn terminal_events(job: &Value) -> usize {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["from"] != e["to"]
                && matches!(e["to"].as_str(), Some("succeeded" | "failed" | "canceled"))
        })
        .count()
}

/// For tests that assert what the callback did: the reconciler stays out of the way unless a
/// callback is very late, however loaded the machine.
fn callbacks_first(config: &mut falgate::config::Config) {
    config.workers.callback_grace = Duration::from_secs(15);
}

backend_tests!(
    a_job_goes_to_fal_and_succeeds_through_its_callback,
    callbacks_first
);
async fn a_job_goes_to_fal_and_succeeds_through_its_callback(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "a red apple", "seed": 42})).await;
    let job = app.wait_for_status(&id, "succeeded").await;

    // What FAL received: the exact input, the webhook in the query only.
    let submits = app.fal.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!(
        submits[0].input,
        json!({"prompt": "a red apple", "seed": 42})
    );
    let webhook = submits[0].webhook.clone().expect("a webhook URL");
    assert!(
        webhook.starts_with(&format!("{}/v1/fal/webhook/{id}?token=", app.base)),
        "{webhook}"
    );
    assert_eq!(
        job["fal_request_id"].as_str(),
        submits[0].request_id.as_deref()
    );

    // The result is FAL's, with a real image the emulator serves.
    let image = &job["result"]["images"][0];
    let bytes = app
        .client
        .get(image["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(job["result"]["seed"], 42);

    // Usually the submit answer is recorded first; under load FAL's callback can beat it, and
    // then the callback's request id is adopted. Either way: one request, ended by the callback.
    let history = events(&job);
    let submitted = ("submitted".to_owned(), "dispatcher".to_owned());
    let expected: Vec<(String, String)> = if history.contains(&submitted) {
        vec![
            ("pending".into(), "api".into()),
            submitted,
            ("succeeded".into(), "callback".into()),
        ]
    } else {
        vec![
            ("pending".into(), "api".into()),
            ("succeeded".into(), "callback".into()),
        ]
    };
    assert_eq!(history, expected);
    let stored = app
        .store()
        .list_callbacks(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].signature.as_str(), stored[0].outcome.as_str()),
        ("valid", "applied")
    );
    // The emulator records a delivery once it has its answer, a moment after falgate acted.
    let attempt = &eventually("the delivery recorded")
        .until(async || app.fal.callback_attempts().first().cloned())
        .await;
    assert_eq!(
        stored[0].body,
        attempt.body.as_bytes(),
        "stored byte for byte"
    );
}

backend_tests!(a_dropped_callback_is_made_good_by_the_reconciler);
async fn a_dropped_callback_is_made_good_by_the_reconciler(app: &TestApp) {
    app.fal.inject_callback_fault(CallbackFault::Drop, 1);
    let id = submit_raw(app, json!({"prompt": "no callback"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(events(&job).last().unwrap().1, "reconciler");
    assert!(job["result"]["images"][0]["url"].is_string());
    assert!(
        app.store()
            .list_callbacks(id.parse().unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}

backend_tests!(
    duplicated_and_reordered_callbacks_change_nothing,
    callbacks_first
);
async fn duplicated_and_reordered_callbacks_change_nothing(app: &TestApp) {
    app.fal.inject_callback_fault(CallbackFault::Duplicate, 1);
    let id = submit_raw(app, json!({"prompt": "twice"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    let job_id = id.parse().unwrap();
    let stored = eventually("both deliveries stored")
        .until(async || {
            let stored = app.store().list_callbacks(job_id).await.unwrap();
            (stored.len() == 2).then_some(stored)
        })
        .await;
    let outcomes: Vec<&str> = stored.iter().map(|c| c.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["applied", "duplicate"]);
    let again = app.job(&id).await;
    assert_eq!(terminal_events(&again), 1);
    assert_eq!(again["result"], job["result"]);

    // Reordered: the first job's callback is held back until the second's has been delivered.
    app.fal.inject_callback_fault(CallbackFault::Reorder, 1);
    let first = submit_raw(app, json!({"prompt": "held back"})).await;
    eventually("the first callback is held")
        .until(async || {
            app.fal
                .requests()
                .iter()
                .any(|r| r.input["prompt"] == "held back" && r.phase == Phase::Completed)
                .then_some(())
        })
        .await;
    let second = submit_raw(app, json!({"prompt": "overtakes"})).await;
    let a = app.wait_for_status(&first, "succeeded").await;
    let b = app.wait_for_status(&second, "succeeded").await;
    assert_eq!(a["result"]["prompt"], "held back");
    assert_eq!(b["result"]["prompt"], "overtakes");
}

backend_tests!(
    forged_and_tampered_callbacks_are_refused_and_change_nothing,
    callbacks_first
);
async fn forged_and_tampered_callbacks_are_refused_and_change_nothing(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "genuine", "seed": 1})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    let genuine = eventually("the delivery recorded")
        .until(async || app.fal.callback_attempts().first().cloned())
        .await;
    let signer = CallbackSigner::new(vec![Secret::new(TEST_WEBHOOK_SECRET)]).unwrap();
    let url = |token: &str| app.url(&format!("/v1/fal/webhook/{id}?token={token}"));
    let send = |url: String, body: String, signature: String, timestamp: String| {
        let request_id = genuine.request_id.clone();
        let client = app.client.clone();
        async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .header("x-fal-webhook-request-id", request_id)
                .header("x-fal-webhook-user-id", "github|0")
                .header("x-fal-webhook-timestamp", timestamp)
                .header("x-fal-webhook-signature", signature)
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let token = signer.token(&id);

    // The genuine delivery again: harmless.
    let replay = send(
        url(&token),
        genuine.body.clone(),
        genuine.signature.clone(),
        genuine.timestamp.clone(),
    )
    .await;
    assert_eq!(replay.status(), StatusCode::OK);

    // A wrong token: refused before anything is stored.
    let stored_before = app
        .store()
        .list_callbacks(id.parse().unwrap())
        .await
        .unwrap()
        .len();
    let wrong = send(
        url("Zm9yZ2Vk"),
        genuine.body.clone(),
        genuine.signature.clone(),
        genuine.timestamp.clone(),
    )
    .await;
    problem(wrong, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let other_job = signer.token(&uuid::Uuid::now_v7().to_string());
    let misused = send(
        url(&other_job),
        genuine.body.clone(),
        genuine.signature.clone(),
        genuine.timestamp.clone(),
    )
    .await;
    problem(misused, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(
        app.store()
            .list_callbacks(id.parse().unwrap())
            .await
            .unwrap()
            .len(),
        stored_before
    );

    // A tampered body and a made-up signature: refused, kept as rejected, job untouched.
    let tampered = genuine.body.replace("genuine", "tampered");
    let refused = send(
        url(&token),
        tampered,
        genuine.signature.clone(),
        genuine.timestamp.clone(),
    )
    .await;
    problem(refused, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let forged = send(
        url(&token),
        genuine.body.clone(),
        "ab".repeat(64),
        genuine.timestamp.clone(),
    )
    .await;
    problem(forged, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let unsigned = app
        .client
        .post(url(&token))
        .body(genuine.body.clone())
        .send()
        .await
        .unwrap();
    problem(unsigned, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let after = app.job(&id).await;
    assert_eq!(after["result"], job["result"]);
    assert_eq!(terminal_events(&after), 1);
    let outcomes: Vec<String> = app
        .store()
        .list_callbacks(id.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec!["applied", "duplicate", "rejected", "rejected", "rejected"]
    );
}

backend_tests!(a_stale_signature_is_kept_and_fal_is_asked_instead);
async fn a_stale_signature_is_kept_and_fal_is_asked_instead(app: &TestApp) {
    app.fal
        .inject_callback_fault(CallbackFault::StaleTimestamp, 1);
    let id = submit_raw(app, json!({"prompt": "old news"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(events(&job).last().unwrap().1, "reconciler");
    let stored = app
        .store()
        .list_callbacks(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (stored[0].signature.as_str(), stored[0].outcome.as_str()),
        ("stale", "stale")
    );
}

backend_tests!(a_bad_signature_is_refused_and_the_retry_applies);
async fn a_bad_signature_is_refused_and_the_retry_applies(app: &TestApp) {
    app.fal
        .inject_callback_fault(CallbackFault::BadSignature, 1);
    let id = submit_raw(app, json!({"prompt": "second try"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert!(job["result"]["images"].is_array());
    let stored = app
        .store()
        .list_callbacks(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored[0].outcome, "rejected");
    assert_eq!(stored[0].signature, "invalid");
    let refused = app.fal.callback_attempts();
    assert_eq!(refused[0].status, Some(401));
}

backend_tests!(
    a_rotated_signing_key_is_fetched_once_and_trusted,
    callbacks_first
);
async fn a_rotated_signing_key_is_fetched_once_and_trusted(app: &TestApp) {
    let first = submit_raw(app, json!({"prompt": "old key"})).await;
    app.wait_for_status(&first, "succeeded").await;
    app.fal.rotate_key(false);
    let second = submit_raw(app, json!({"prompt": "new key"})).await;
    let job = app.wait_for_status(&second, "succeeded").await;
    assert_eq!(
        events(&job).last().unwrap().1,
        "callback",
        "verified with the new key"
    );
}

backend_tests!(fal_busy_then_available_is_retried);
async fn fal_busy_then_available_is_retried(app: &TestApp) {
    app.fal
        .inject_fault(FaultRule::submit(FaultRule::status(429), 1));
    app.fal
        .inject_fault(FaultRule::submit(FaultRule::status(503), 1));
    let id = submit_raw(app, json!({"prompt": "patience"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(job["attempts"], 3);
    assert!(
        job["error"].is_null(),
        "the retries' errors are cleared: {job}"
    );
    let submits = app.fal.submits();
    assert_eq!(submits.len(), 3);
    assert!(submits[0].request_id.is_none() && submits[1].request_id.is_none());
    assert_eq!(app.fal.requests().len(), 1, "one FAL request in the end");
}

backend_tests!(fal_refusing_the_input_fails_the_job_with_its_detail);
async fn fal_refusing_the_input_fails_the_job_with_its_detail(app: &TestApp) {
    // Refused at submit.
    let detail = json!({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]});
    app.fal.inject_fault(FaultRule::submit(
        HttpFault::Status {
            status: 422,
            body: Some(detail.clone()),
            retry_after: None,
            timeout_type_user: false,
        },
        1,
    ));
    let id = submit_raw(app, json!({"prompt": "refused"})).await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "fal_validation");
    assert_eq!(job["error"]["detail"], detail["detail"]);
    assert_eq!(job["attempts"], 1, "never retried");

    // Accepted, then failed by the model: the callback carries FAL's 422.
    let id = submit_raw(app, json!({"prompt": "too many", "num_images": 5})).await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "fal_validation");
    let loc = &job["error"]["detail"]["detail"][0]["loc"];
    assert_eq!(loc, &json!(["body", "num_images"]), "{job}");
    assert!(job["result"].is_null());
}

backend_tests!(
    an_accepted_submit_whose_answer_is_lost_runs_once,
    callbacks_first
);
async fn an_accepted_submit_whose_answer_is_lost_runs_once(app: &TestApp) {
    let id = submit_raw_meeting(app, HttpFault::AcceptThenReset, 1, "exactly once").await;
    let job = app.wait_for_status(&id, "succeeded").await;
    let requests = app.fal.requests();
    assert_eq!(requests.len(), 1, "no second FAL request: {requests:?}");
    assert_eq!(
        job["fal_request_id"].as_str(),
        Some(requests[0].id.as_str())
    );
}

/// For the cancels: the reconciler asks FAL soon after a missed callback.
fn short_callback_grace(config: &mut falgate::config::Config) {
    config.workers.callback_grace = Duration::from_millis(200);
}

backend_tests!(
    a_pending_job_is_cancelled_here_and_never_reaches_fal,
    short_callback_grace
);
async fn a_pending_job_is_cancelled_here_and_never_reaches_fal(app: &TestApp) {
    // FAL keeps refusing, so the job never leaves; the cancel ends it here.
    let pending = submit_raw_meeting(app, FaultRule::status(503), 1000, "never sent").await;
    eventually("a refused attempt")
        .until(async || (!app.fal.submits().is_empty()).then_some(()))
        .await;
    let canceled = app.cancel(&pending).await;
    assert_eq!(canceled["status"], "canceled");
    // A submit claimed just before the cancel may still be on its way: every attempt must
    // have met the armed refusal before it is lifted.
    let attempts = canceled["attempts"].as_u64().unwrap() as usize;
    eventually("every attempt refused")
        .until(async || {
            let sent = app
                .fal
                .submits()
                .iter()
                .filter(|s| s.input["prompt"] == "never sent")
                .count();
            (sent == attempts).then_some(())
        })
        .await;
    app.fal.clear_faults();

    // Nothing of the job ever reached FAL's queue.
    assert!(
        app.fal
            .submits()
            .iter()
            .filter(|s| s.input["prompt"] == "never sent")
            .all(|s| s.request_id.is_none())
    );
}

backend_tests!(
    a_job_queued_at_fal_ends_on_fals_confirmation_of_the_cancel,
    short_callback_grace
);
async fn a_job_queued_at_fal_ends_on_fals_confirmation_of_the_cancel(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(30_000, 30_000));
    let queued = submit_raw(app, json!({"prompt": "waits in line"})).await;
    app.wait_for_status(&queued, "submitted").await;
    let answer = app.cancel(&queued).await;
    assert_eq!(answer["status"], "submitted");
    assert!(answer["cancel_requested_at"].is_string());
    app.wait_for_status(&queued, "canceled").await;
    assert_eq!(app.fal.cancels().len(), 1);
}

backend_tests!(
    a_job_running_at_fal_ends_canceled_without_a_result,
    short_callback_grace
);
async fn a_job_running_at_fal_ends_canceled_without_a_result(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(0, 30_000));
    let running = submit_raw(app, json!({"prompt": "already drawing"})).await;
    app.wait_for_status(&running, "running").await;
    app.cancel(&running).await;
    let job = app.wait_for_status(&running, "canceled").await;
    assert!(job["result"].is_null());
    assert_eq!(app.fal.cancels().len(), 1);
}

backend_tests!(
    a_cancel_after_fal_finished_is_409_and_the_result_stays,
    short_callback_grace
);
async fn a_cancel_after_fal_finished_is_409_and_the_result_stays(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(0, 0));
    let done = submit_raw(app, json!({"prompt": "finished"})).await;
    app.wait_for_status(&done, "succeeded").await;
    let response = app.post(&format!("/v1/jobs/{done}/cancel")).await;
    problem(response, StatusCode::CONFLICT, "job_finished").await;
}

backend_tests!(
    without_a_public_url_jobs_are_followed_by_polling,
    |config| {
        config.public_url = None;
    }
);
async fn without_a_public_url_jobs_are_followed_by_polling(app: &TestApp) {
    let id = submit_raw(app, json!({"prompt": "polled"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    assert!(app.fal.submits()[0].webhook.is_none());
    assert_eq!(events(&job).last().unwrap().1, "reconciler");
}

backend_tests!(a_refused_fal_key_fails_jobs_and_shows_in_readiness);
async fn a_refused_fal_key_fails_jobs_and_shows_in_readiness(app: &TestApp) {
    let id = submit_raw_meeting(app, FaultRule::status(401), 1, "no key").await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "fal_unauthorized");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["fal"], "key_refused");
    // The next accepted submit clears it.
    let ok = submit_raw(app, json!({"prompt": "key fixed"})).await;
    app.wait_for_status(&ok, "succeeded").await;
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

backend_tests!(
    a_surplus_fal_request_is_cancelled_and_the_first_kept,
    |config| {
        // Resend at once after the lost answer, so the second submit races the first's
        // callback: a resend decided with eyes open, whose surplus request is withdrawn.
        config.workers.callback_grace = Duration::ZERO;
        config.workers.unconfirmed_submit_wait = Duration::ZERO;
    }
);
async fn a_surplus_fal_request_is_cancelled_and_the_first_kept(app: &TestApp) {
    // Every request waits in FAL's queue until the test lets it go.
    app.fal.set_all_durations(Durations::new(600_000, 0));
    // The first submit is accepted but its answer lost; the second is held at FAL's door
    // until the first request's callback has been adopted.
    app.fal
        .inject_fault(FaultRule::submit(HttpFault::AcceptThenReset, 1));
    app.fal.inject_fault(FaultRule::submit(HttpFault::Hold, 1));
    let id = submit_raw(app, json!({"prompt": "one of two"})).await;
    eventually("the second submit held")
        .until(async || (app.fal.held_calls() == 1).then_some(()))
        .await;
    let first = app.fal.requests();
    assert_eq!(first.len(), 1, "{first:?}");
    app.fal
        .set_request_durations(&first[0].id, Durations::new(0, 0));
    let job = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(job["fal_request_id"], first[0].id.as_str());
    // Now FAL takes the second submit: a surplus request, withdrawn while it waits.
    app.fal.release_held_calls();
    let kept = job["fal_request_id"].as_str().unwrap().to_owned();
    let cancels = eventually("the surplus request cancelled")
        .until(async || {
            let cancels = app.fal.cancels();
            (!cancels.is_empty()).then_some(cancels)
        })
        .await;
    assert_eq!(cancels.len(), 1);
    assert_ne!(
        cancels[0].request_id, kept,
        "the kept request is never cancelled"
    );
    assert_eq!(cancels[0].answered, 202);
    let requests = app.fal.requests();
    assert_eq!(requests.len(), 2);
    let succeeded: Vec<_> = requests
        .iter()
        .filter(|r| r.outcome.as_ref().is_some_and(|o| o.status == 200))
        .collect();
    assert_eq!(succeeded.len(), 1, "only one request ran to a result");
    assert_eq!(succeeded[0].id, kept);
    assert_eq!(terminal_events(&app.job(&id).await), 1);
}

backend_tests!(
    a_cancel_that_comes_too_late_keeps_the_result,
    with_callback_grace(Duration::from_millis(100))
);
async fn a_cancel_that_comes_too_late_keeps_the_result(app: &TestApp) {
    // Held running until the cancel is in; FAL then refuses it as already completed.
    app.fal.set_all_durations(Durations::new(0, 600_000));
    app.fal.inject_fault(FaultRule {
        target: falgate::emulator::FaultTarget::Cancel,
        fault: HttpFault::Status {
            status: 400,
            body: Some(json!({"status": "ALREADY_COMPLETED"})),
            retry_after: None,
            timeout_type_user: false,
        },
        count: 1,
    });
    let id = submit_raw(app, json!({"prompt": "too late to stop"})).await;
    app.wait_for_status(&id, "running").await;
    app.cancel(&id).await;
    app.fal.set_all_durations(Durations::new(0, 0));
    let job = app.wait_for_status(&id, "succeeded").await;
    assert!(job["result"]["images"].is_array());
    assert!(job["cancel_requested_at"].is_string());
}

backend_tests!(
    a_job_past_its_deadline_fails_and_is_withdrawn_from_fal,
    |config| {
        config.workers.generation_deadline = Duration::from_secs(1);
        config.workers.callback_grace = Duration::from_millis(100);
    }
);
async fn a_job_past_its_deadline_fails_and_is_withdrawn_from_fal(app: &TestApp) {
    app.fal.set_all_durations(Durations::new(0, 60_000));
    let id = submit_raw(app, json!({"prompt": "forever"})).await;
    let job = app.wait_for_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "deadline_exceeded");
    assert!(job["result"].is_null());
    eventually("the overdue request withdrawn")
        .until(async || {
            app.fal
                .cancels()
                .iter()
                .any(|c| Some(c.request_id.as_str()) == job["fal_request_id"].as_str())
                .then_some(())
        })
        .await;
}

backend_tests!(a_callback_that_cannot_be_stored_gets_a_5xx_and_is_not_lost);
async fn a_callback_that_cannot_be_stored_gets_a_5xx_and_is_not_lost(app: &TestApp) {
    // The callbacks table is out of reach: the receiver must not answer 2xx.
    let rename = "ALTER TABLE fal_callbacks RENAME TO fal_callbacks_unavailable";
    execute_behind_the_apps_back!(app, rename);
    let id = submit_raw(app, json!({"prompt": "kept anyway"})).await;
    let job = app.wait_for_status(&id, "succeeded").await;
    // Every callback FAL got an answer to was refused with a 5xx, never acknowledged.
    let answered: Vec<u16> = eventually("a callback answered")
        .until(async || {
            let answered: Vec<u16> = app
                .fal
                .callback_attempts()
                .iter()
                .filter_map(|a| a.status)
                .collect();
            (!answered.is_empty()).then_some(answered)
        })
        .await;
    assert!(answered.iter().all(|s| *s == 500), "{answered:?}");
    // FAL's retries failed too; the reconciler fetched the result instead.
    assert_eq!(events(&job).last().unwrap().1, "reconciler");
    assert!(job["result"]["images"].is_array());
}
